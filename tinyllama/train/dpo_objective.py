"""The DPO objective: preference pairs against a frozen reference, on the one training loop.

Built before any step (tinyllama.train.objectives.build_objective), it reads every train pair
(tinyllama.data.preferences), encodes it and checks that it fits train.seq_len, so a bad file is
refused before anything is written. The reference is the policy as it is at construction, the
init_from weights (the loop builds the objective before it restores a checkpoint, so a resumed
run keeps the same reference): a frozen copy (for a LoRA policy, its own base with the adapters
switched off, no copy), or with dpo.precompute_ref the reference log-probs of every train pair
computed here once, and no second model kept.

Each micro-batch is train.batch_size pairs (2 x batch_size rows) in a seeded order per epoch,
dealt to ranks so that they read disjoint pairs (tinyllama.data.loader.ResumableLoader); the
position is this objective's state, saved per rank for an exact resume. The loss is the mean
dpo_loss of the pairs, plus dpo.nll_weight x the mean NLL per token of the chosen replies (RPO).
Logged per training line, as TRL names them: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (means over the pairs of every
rank since the last line), and nll_loss with an NLL term.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from tinyllama.chat_template import require_chat_pieces
from tinyllama.config import JobConfig
from tinyllama.data.loader import ResumableLoader
from tinyllama.data.preferences import read_pairs
from tinyllama.data.sft_batches import padding_id
from tinyllama.dpo import EncodedPair, PairBatch, collate_pairs, dpo_loss, encode_pairs, sequence_logps
from tinyllama.errors import DataError
from tinyllama.train.distributed import DistEnv
from tinyllama.train.objectives import Objective, reference_model
from tinyllama.train.precision import resolve_precision

# What window() logs, in TRL's names; each is a mean over pairs (nll_loss: over chosen tokens).
FIGURES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class PairOrder(ResumableLoader):
    """Which pairs each micro-batch takes: a permutation of the pairs per epoch, seeded by
    (seed, epoch), the epochs end to end dealt to ranks round-robin (ResumableLoader);
    the position (epoch, pairs taken by all ranks) is the same on every rank. `digest` names the pairs, so
    a state saved on other pairs is refused."""

    def __init__(self, n_pairs: int, batch_size: int, seed: int, rank: int, world_size: int, digest: str):
        if n_pairs < world_size:
            raise DataError(
                f"{n_pairs} preference pairs cannot give each of {world_size} ranks one: give more"
            )
        self.n_pairs, self.batch_size, self.seed, self.digest = n_pairs, batch_size, seed, digest
        self._start(rank, world_size)

    def _epoch_order(self, epoch: int) -> Tuple[None, np.ndarray]:
        return None, np.random.default_rng([self.seed, epoch]).permutation(self.n_pairs)

    def next_indices(self) -> List[int]:
        """The pair indices of this rank's next micro-batch (batch_size of them)."""
        return [i for _, i in self._next_items()]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.taken,
            "order": "global",
            "seed": self.seed,
            "world_size": self.world_size,
            "pairs": self.n_pairs,
            "digest": self.digest,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue where `state` left off; refuse a state that would not replay the same pairs."""
        for key, mine in (
            ("seed", self.seed),
            ("world_size", self.world_size),
            ("pairs", self.n_pairs),
            ("digest", self.digest),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the DPO pairs exactly: the saved {key} is {state.get(key)!r}, this "
                    f"run has {mine!r}; resume with the same pairs, run.seed and number of processes"
                )
        position = int(state["position"])
        if state.get("order") != "global":  # saved when ranks counted their own pairs
            position *= self.world_size
        self.epoch, self.taken, self._orders = int(state["epoch"]), position, {}


def pairs_digest(encoded: List[EncodedPair]) -> str:
    """A short hash of the encoded pairs (ids and labels of both rows, in order)."""
    h = hashlib.blake2b(digest_size=8)
    for e in encoded:
        for ids, labels in (e.chosen, e.rejected):
            h.update(np.asarray(ids + [-1] + labels + [-2], dtype=np.int64).tobytes())
    return h.hexdigest()


class DPOObjective(Objective):
    """See the module docstring. `model` is the plain policy on env.device, as initialised;
    `autocast`: the context the loop runs the policy's forward passes in."""

    def __init__(
        self,
        job: JobConfig,
        env: DistEnv,
        model: nn.Module,
        tokenizer,
        autocast: Optional[Callable[[], ContextManager]] = None,
    ) -> None:
        require_chat_pieces(tokenizer)
        self.cfg, self.env, t = job.dpo, env, job.train
        self.encoded = encode_pairs(tokenizer, read_pairs(job.dpo, job.data, "train"), t.seq_len)
        self.order = PairOrder(
            len(self.encoded),
            t.batch_size,
            job.run.seed,
            env.rank,
            env.world_size,
            pairs_digest(self.encoded),
        )
        self.pad_id = padding_id(tokenizer)
        # The reference scores pairs under the autocast the policy trains under (the loop calls
        # next_batch outside it), so that the two log-probs of a pair differ only by the weights;
        # the loop's own context when it passes one, else the same one resolved from the config.
        self.autocast = autocast or resolve_precision(t.precision, env.device).autocast
        self.reference, self.ref_logps = None, None
        if self.cfg.precompute_ref:
            self.ref_logps = self._precompute(model, t.batch_size)  # (N, 2) chosen, rejected
        else:
            self.reference = reference_model(model)
        names = FIGURES + (("nll_loss",) if self.cfg.nll_weight else ())
        self.names = names
        self._sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=env.device)  # + pairs
        self._total = torch.zeros_like(self._sums)

    @torch.no_grad()
    def _precompute(self, model: nn.Module, batch_size: int) -> torch.Tensor:
        """(N, 2) float32 on the CPU: the reference log-probs of every train pair, chosen and
        rejected. Each rank scores a share of the pairs and they swap results (later epochs deal
        any pair to any rank)."""
        was_training = model.training
        model.eval()
        mine = list(range(self.env.rank, len(self.encoded), self.env.world_size))
        values: List[List[float]] = []
        for start in range(0, len(mine), batch_size):
            chunk = [self.encoded[i] for i in mine[start : start + batch_size]]
            batch = collate_pairs(chunk, self.pad_id).to(self.env.device)
            with self.autocast():
                logps = sequence_logps(model, batch)[0]
            values += logps.view(2, -1).T.float().cpu().tolist()
        model.train(was_training)
        ref = torch.zeros(len(self.encoded), 2)
        for indices, logps in self.env.all_gather_object((mine, values)):
            ref[indices] = torch.tensor(logps).view(-1, 2)
        return ref

    def next_batch(self) -> PairBatch:
        indices = self.order.next_indices()
        batch = collate_pairs([self.encoded[i] for i in indices], self.pad_id).to(self.env.device)
        if self.ref_logps is not None:
            ref = self.ref_logps[indices]  # (B, 2) -> rows: chosen then rejected
            batch.ref_logps = ref.T.reshape(-1).to(self.env.device)
        else:
            with torch.no_grad(), self.autocast():
                batch.ref_logps = sequence_logps(self.reference, batch)[0]
        return batch

    def loss(self, model: nn.Module, batch: PairBatch) -> torch.Tensor:
        logps, tokens = sequence_logps(model, batch)  # one forward for chosen and rejected rows
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = batch.ref_logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        d = self.cfg
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            d.beta,
            d.loss_type,
            d.label_smoothing,
            chosen_tokens,
            rejected_tokens,
        )
        loss = losses.mean()
        figures = [
            chosen_rewards,
            rejected_rewards,
            (chosen_rewards > rejected_rewards).float(),
            chosen_rewards - rejected_rewards,
            chosen.detach(),
            rejected.detach(),
        ]
        if d.nll_weight:
            nll = -chosen.sum() / chosen_tokens.sum()  # the mean NLL per chosen token
            loss = loss + d.nll_weight * nll
            figures.append(nll.detach().expand(batch.pairs))
        # Sums on the device, read once per training line (no sync per micro-step).
        self._sums += torch.stack(
            [f.sum() for f in figures] + [torch.tensor(batch.pairs, device=logps.device)]
        ).double()
        return loss

    def window(self) -> Dict[str, float]:
        sums = self.env.mean(self._sums)  # every rank saw as many pairs: the mean of means
        self._total += sums
        self._sums = torch.zeros_like(self._sums)
        *figures, pairs = sums.tolist()
        return {name: value / max(pairs, 1) for name, value in zip(self.names, figures)}

    def total(self) -> Dict[str, float]:
        """Over this launch's logged steps: the pairs trained on (every rank's) and the mean reward accuracy."""
        *figures, pairs = self._total.tolist()
        return {
            "dpo_pairs": int(pairs) * self.env.world_size,
            "rewards/accuracies": figures[2] / max(pairs, 1),
        }

    def state_dict(self) -> Dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.order.load_state_dict(state)
