"""Validation during training; owns its schedule (a Cadence: every `eval.every` steps and at the
end)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager, Optional

from torch import nn

from tinyllama.config import EvalConfig
from tinyllama.data import eval_batches, sft_eval_batches
from tinyllama.losses import evaluate_loss
from tinyllama.train.cadence import Cadence
from tinyllama.train.distributed import DistEnv


class Evaluator:
    """Validation loss of `model` on the packed validation split, each rank over its own share.

    batch_size, seq_len: as in training (validation sees the same context length).
    on_result(step, val_loss): called on every rank after each evaluation (the tracker's log_eval).
    conversations: packed_dir holds conversation windows (tinyllama.data.sft_data); the loss is
    then over the tokens that carry labels (the assistant's, unless data.train_on=all).
    best_loss is part of the run's checkpointed state; the checkpointer records loss_at(step) as
    each checkpoint's validation loss and, on resume, `remember`s it.
    """

    def __init__(
        self,
        model: nn.Module,
        packed_dir: Path,
        cfg: EvalConfig,
        batch_size: int,
        seq_len: int,
        env: DistEnv,
        autocast: Callable[[], ContextManager],
        max_steps: int,
        on_result: Callable[[int, float], None],
        conversations: bool = False,
    ) -> None:
        self.model, self.packed_dir, self.cfg = model, packed_dir, cfg
        self.batch_size, self.seq_len, self.env = batch_size, seq_len, env
        self.autocast, self.on_result, self.conversations = autocast, on_result, conversations
        self.cadence = Cadence(cfg.every, max_steps)
        self.last_loss: Optional[float] = None  # measured at step cadence.done
        self.best_loss: Optional[float] = None

    def loss_at(self, step: int) -> Optional[float]:
        """The validation loss measured at exactly `step`, if any (checkpoints record it)."""
        return self.last_loss if self.cadence.done == step else None

    def remember(self, step: int, loss: float) -> None:
        """Take `loss` as measured at `step` (a resumed run is not evaluated there again)."""
        self.cadence.mark(step)
        self.last_loss = loss

    def maybe_eval(self, step: int, force: bool = False) -> Optional[float]:
        """Evaluate at step 0, multiples of eval.every and max_steps (or when forced); each step
        is evaluated at most once. Returns the validation loss, or None when not due."""
        if self.cadence.done == step:
            return self.last_loss
        if not self.cadence.due(step, force):
            return None
        share = dict(max_batches=self.cfg.batches or None, rank=self.env.dp_rank, world_size=self.env.dp_size)
        if self.conversations:  # the held-out windows: loss on the tokens that carry labels
            batches = sft_eval_batches(self.packed_dir, "val", self.batch_size, **share)
        else:
            batches = eval_batches(self.packed_dir, "val", self.batch_size, self.seq_len, **share)
        loss = evaluate_loss(self.model, batches, self.env.device, self.autocast)["loss"]
        self.remember(step, loss)
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss = loss
        self.on_result(step, loss)
        return loss
