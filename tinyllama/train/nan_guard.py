"""Guard against a diverged run: a NaN or infinite loss (or gradient norm) never reaches the
weights, so no checkpoint is ever written from bad weights.

train.nan_policy="stop" raises NonFiniteLossError; "skip" drops that step's update and goes on,
but gives up after MAX_CONSECUTIVE_SKIPS bad steps in a row (the run has diverged for good).
"""

from __future__ import annotations

from tinyllama.config import NAN_POLICIES
from tinyllama.errors import ConfigError, TinyLlamaError

MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteLossError(TinyLlamaError):
    """The loss or the gradients became NaN/inf: the run diverged."""


class NanGuard:
    def __init__(self, policy: str) -> None:
        if policy not in NAN_POLICIES:
            raise ConfigError(f"train.nan_policy={policy!r}: choose {' or '.join(NAN_POLICIES)}")
        self.policy = policy
        self.skipped = 0
        self._in_a_row = 0

    def should_skip(self, step: int, finite: bool, what: str) -> bool:
        """Decide for optimizer step `step` whose `what` ("loss 'nan'") is (not) finite.
        Returns True if the update must be skipped; raises under the stop policy."""
        if finite:
            self._in_a_row = 0
            return False
        hint = (
            "the last checkpoint is intact; lower optim.lr, raise optim.warmup_steps, keep "
            "train.grad_clip > 0 or use train.precision=fp32/bf16, then resume"
        )
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} at step {step}: stopping. {hint} "
                "(or set train.nan_policy=skip to skip such steps)"
            )
        self.skipped += 1
        self._in_a_row += 1
        if self._in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(
                f"non-finite {what} for {self._in_a_row} steps in a row "
                f"(last at step {step}): the run has diverged; {hint}"
            )
        return True
