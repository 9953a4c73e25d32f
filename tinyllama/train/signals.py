"""Graceful stop on SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, save, exit.

The handler only raises a flag; the loop checks it between optimizer steps (all ranks agree
through `DistEnv.any`), saves a checkpoint and returns. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable, Dict, Optional


class StopRequest:
    """Context manager installing the handlers; `requested` turns True on the first signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: Callable[[str], None] = print) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self._announce = announce
        self._previous: Dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user means it
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self._announce(f"{self.signal_name} received: finishing this step, saving a checkpoint, then exiting")

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be installed from the main thread (not e.g. under a notebook's
        # worker thread); elsewhere the run simply is not interruptible this way.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
