"""The loop's one reporting hook, on_eval(step, val_loss) -> stop: what a search's pruning
rests on, with no search involved."""

from __future__ import annotations

import json

from tinyllama.config import run_dir_of
from tinyllama.train.loop import run_training


def test_on_eval_sees_each_evaluation_and_can_end_the_run(tiny_job):
    tiny_job.train.max_steps, tiny_job.eval.every = 30, 10
    seen = []

    def on_eval(step, val_loss):
        seen.append((step, val_loss))
        return step == 20  # "pruned" at the second in-run evaluation

    returned = run_training(tiny_job, on_eval=on_eval)
    run = run_dir_of(tiny_job)
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    # Steps 10 and 20, not step 0 (nothing learnt yet) nor the last one (the run is complete).
    assert [s for s, _ in seen] == [10, 20] and [e["step"] for e in evals] == [0, 10, 20]
    assert returned == seen[-1][1] == evals[-1]["val_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pruned"] is True and summary["final_val_loss"] == returned
    assert not (run / "samples.txt").exists()  # a stopped trial is not sampled


def test_a_hook_that_never_stops_changes_nothing(tiny_job, tmp_path):
    tiny_job.train.max_steps = 20
    seen = []
    final = run_training(tiny_job, on_eval=lambda step, loss: seen.append(step) or False)
    assert seen == [10]  # step 20 is the last: not offered for pruning
    summary = json.loads((run_dir_of(tiny_job) / "summary.json").read_text())
    assert summary["pruned"] is False and summary["final_val_loss"] == final
