"""Validation during training; owns its schedule (every `eval.every` steps and at the end)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager, Optional

from torch import nn

from tinyllama.config import EvalConfig
from tinyllama.evaluate import evaluate_loss
from tinyllama.train.distributed import DistEnv


class Evaluator:
    """Validation loss of `model` on the packed validation split, each rank over its own share.

    batch_size, seq_len: as in training (validation sees the same context length).
    on_result(step, val_loss): called on every rank after each evaluation (the tracker's log_eval).
    """

    def __init__(self, model: nn.Module, packed_dir: Path, cfg: EvalConfig, batch_size: int,
                 seq_len: int, env: DistEnv, autocast: Callable[[], ContextManager],
                 max_steps: int, on_result: Callable[[int, float], None]) -> None:
        self.model, self.packed_dir, self.cfg = model, packed_dir, cfg
        self.batch_size, self.seq_len, self.env = batch_size, seq_len, env
        self.autocast, self.max_steps, self.on_result = autocast, max_steps, on_result
        self.last_step: Optional[int] = None
        self.last_loss: Optional[float] = None
        self.best_loss: Optional[float] = None

    def loss_at(self, step: int) -> Optional[float]:
        """The validation loss measured at exactly `step`, if any (checkpoints record it)."""
        return self.last_loss if self.last_step == step else None

    def maybe_eval(self, step: int, force: bool = False) -> Optional[float]:
        """Evaluate at step 0, multiples of eval.every and max_steps (or when forced); each step
        is evaluated at most once. Returns the validation loss, or None when not due."""
        if self.last_step == step:
            return self.last_loss
        if not (force or step % self.cfg.every == 0 or step == self.max_steps):
            return None
        from tinyllama.data import eval_batches

        batches = eval_batches(self.packed_dir, "val", self.batch_size, self.seq_len,
                               max_batches=self.cfg.batches or None,
                               rank=self.env.rank, world_size=self.env.world_size)
        loss = evaluate_loss(self.model, batches, self.env.device, self.autocast)["loss"]
        self.last_step, self.last_loss = step, loss
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss = loss
        self.on_result(step, loss)
        return loss
