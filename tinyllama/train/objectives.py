"""What a training step minimises: the loop's one seam for pretraining, SFT, DPO and GRPO.

    objective = build_objective(job, env, model, tokenizer, packed_dir, autocast)   # loop.py
    batch = objective.next_batch()          # outside autocast: data, rollouts, reference log-probs
    loss = objective.loss(train_model, batch)  # under autocast, for backward

The loop (tinyllama/train/loop.py) runs grad_accum of these pairs per optimizer step, whatever
the objective; what differs lives here and in the modules each objective names:

- "lm": next-token cross-entropy over packed documents (pretraining) or packed conversations
  (supervised fine-tuning, loss on the assistant's tokens): `LMObjective`;
- "dpo": preference pairs against a frozen reference (tinyllama/train/dpo_objective.py);
  the reference of both post-training objectives is `reference_model` (a frozen copy, or a
  LoRA policy's own base with its adapters off);
- "grpo": completions sampled from the policy, scored by rewards (tinyllama/train/grpo.py).

An objective is stateful like everything else that resumes (`state_dict` / `load_state_dict`,
saved per rank by the checkpointer), and reports its figures since the last training line
(`window()`, into metrics.jsonl) and over the launch (`total()`, into summary.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from tinyllama.config import JobConfig, is_chat
from tinyllama.data import BatchLoader, SFTBatchLoader
from tinyllama.data.loader import ModelBatch
from tinyllama.lora import adapters_disabled, lora_modules
from tinyllama.train.distributed import DistEnv


class Objective:
    """The interface the loop calls; see the module docstring."""

    def next_batch(self) -> Any:
        """This rank's next micro-batch, with everything computed without gradients."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of `batch` through `model` (the compiled/DDP-wrapped policy)."""
        raise NotImplementedError

    def window(self) -> Dict[str, float]:
        """Figures since the last call, for the next training line (may be empty)."""
        return {}

    def total(self) -> Dict[str, float]:
        """Figures over this launch, for summary.json (may be empty)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError


class LMObjective(Objective):
    """Next-token loss on packed windows: documents, or conversations (then the shares of the
    batches' tokens that are text and that carry loss are logged). Its state is the loader's."""

    def __init__(self, job: JobConfig, env: DistEnv, packed_dir: Path, tokenizer) -> None:
        t = job.train
        self.chat = is_chat(job.data)
        self.device = env.device
        self.loader = (SFTBatchLoader if self.chat else BatchLoader)(
            packed_dir,
            "train",
            t.batch_size,
            t.seq_len,
            seed=job.run.seed,
            rank=env.dp_rank,
            world_size=env.dp_size,
        )
        self.loader.check_compatible(tokenizer.fingerprint, job.model.vocab_size)
        self.shares = TokenShares()

    def next_batch(self) -> Dict[str, torch.Tensor]:
        batch = self.loader.next_inputs()  # input_ids, shift_labels (B, T) (+ packing's)
        if self.chat:  # padding and loss shares: a document batch is all text, all targets
            self.shares.add(batch)
        return batch.to(self.device)

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        # The model applies causal_lm_loss (mean over the targets that are not -100); under
        # gradient checkpointing in chunks without the (B, T, V) logits.
        return model(**batch).loss

    def window(self) -> Dict[str, float]:
        return self.shares.window() if self.chat else {}

    def total(self) -> Dict[str, float]:
        return self.shares.total() if self.chat else {}

    def state_dict(self) -> Dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class TokenShares:
    """Shares of the training batches' tokens that are text (not padding) and that carry loss,
    over the steps since the last training line (window) and over this launch (total); this
    rank's batches (every rank's are alike: windows of the same packing)."""

    def __init__(self) -> None:
        self._window = [0, 0, 0]  # real, loss, all tokens
        self._total = [0, 0, 0]

    def add(self, batch: ModelBatch) -> None:
        counts = (batch.real_tokens, batch.loss_tokens, batch.inputs["input_ids"].numel())
        for acc in (self._window, self._total):
            for i, n in enumerate(counts):
                acc[i] += n

    @staticmethod
    def _shares(acc) -> dict:
        return {"real_share": acc[0] / max(1, acc[2]), "loss_share": acc[1] / max(1, acc[2])}

    def window(self) -> dict:
        shares, self._window = self._shares(self._window), [0, 0, 0]
        return shares

    def total(self) -> dict:
        return self._shares(self._total)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference model: the policy's weights as they are now, in eval mode, without gradients."""
    import copy

    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


class AdaptersOff(nn.Module):
    """The reference of a LoRA policy without a second copy in memory: calling it runs the policy
    itself with every adapter switched off (its frozen base; a module trained whole gets its base
    weight back from the copy apply_lora kept) in eval mode, then puts the policy
    back as it was. The policy is held outside the module tree, so this wrapper has no parameters
    of its own and nothing of it is saved or optimised."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: see the class docstring

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.policy):
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)


def reference_model(model: nn.Module) -> nn.Module:
    """What DPO and GRPO score against: the starting model. For a LoRA policy that is its base,
    the policy with the adapters off (AdaptersOff); else a frozen copy of the policy as it is now
    (built before a resume restores the checkpoint, so it stays init_from's weights)."""
    return AdaptersOff(model) if lora_modules(model) else frozen_copy(model)
