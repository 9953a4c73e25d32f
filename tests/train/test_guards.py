"""The NaN guard and the graceful-stop signal handler."""

from __future__ import annotations

import signal

import pytest

from tinyllama.train.nan_guard import MAX_CONSECUTIVE_SKIPS, NanGuard, NonFiniteLossError
from tinyllama.train.signals import StopRequest


def test_stop_policy_raises_with_the_step_and_the_fix():
    guard = NanGuard("stop")
    assert guard.should_skip(1, True, "loss") is False
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 7.*nan_policy=skip"):
        guard.should_skip(7, False, "loss (nan)")


def test_skip_policy_skips_then_gives_up_on_a_diverged_run():
    guard = NanGuard("skip")
    assert guard.should_skip(1, False, "loss") is True
    assert guard.should_skip(2, True, "loss") is False  # a good step resets the streak
    for step in range(3, 3 + MAX_CONSECUTIVE_SKIPS - 1):
        assert guard.should_skip(step, False, "loss") is True
    with pytest.raises(NonFiniteLossError, match="in a row"):
        guard.should_skip(99, False, "loss")
    assert guard.skipped == MAX_CONSECUTIVE_SKIPS + 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    messages = []
    with StopRequest(messages.append) as stop:
        assert not stop.requested
        signal.raise_signal(sig)
        assert stop.requested and stop.signal_name == signal.Signals(sig).name
        assert "saving a checkpoint" in messages[0]
    assert signal.getsignal(sig) is before


def test_second_ctrl_c_interrupts_at_once():
    with StopRequest(lambda _: None):
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
