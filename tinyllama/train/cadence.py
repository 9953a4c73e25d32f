"""When a periodic job of the loop runs: the evaluator and the checkpointer share this schedule."""

from __future__ import annotations

from typing import Optional


class Cadence:
    """Due at multiples of `every`, at `last_step` (the end of training) and whenever forced (a stop
    signal, the final evaluation), and never twice for one step.

    The job asks `due(step, force)` and calls `mark(step)` once it has run, so a job that raises
    is due again; `done` is the step it last ran at (None: not yet).
    """

    def __init__(self, every: int, last_step: int) -> None:
        self.every, self.last_step = every, last_step
        self.done: Optional[int] = None

    def due(self, step: int, force: bool = False) -> bool:
        return step != self.done and (force or step % self.every == 0 or step == self.last_step)

    def mark(self, step: int) -> None:
        self.done = step
