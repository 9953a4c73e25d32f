"""The run folder through `python train.py` as users launch it (configs/train.yaml, Hydra and
all): a refused command leaves every file byte-identical, and each launch that ran is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllama.compare import load_run
from tinyllama.run_record import read_launches

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def train(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("TINYLLAMA_JOB_DIR", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_commands_leave_the_run_folder_byte_identical(tiny_overrides, tmp_path):
    run = tmp_path / "runs" / "x"
    first = train([*tiny_overrides, f"run.dir={run}"], tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    before = snapshot(run)
    assert {"config.yaml", "launches.jsonl", "metrics.jsonl", "summary.json"} <= set(before)
    assert not any(name.startswith(".hydra") or name.endswith(".log") for name in before)

    refusals = {
        "an existing run with resume=never": (["checkpoint.resume=never"], "nothing was overwritten"),
        "another model shape": (["model.hidden_size=48"], "cannot resume"),
        "another tokenizer": (
            ["tokenizer.name=bpe_384", "tokenizer.vocab_size=384"],
            "tokenizer fingerprint",
        ),
        "a bad config value": (["train.max_steps=-1"], "train.max_steps=-1"),
    }
    for why, (extra, message) in refusals.items():
        proc = train([*tiny_overrides, f"run.dir={run}", *extra], tmp_path)
        assert proc.returncode == 2, (why, proc.stdout[-1000:], proc.stderr[-2000:])
        assert message in proc.stderr, (why, proc.stderr[-2000:])
        assert snapshot(run) == before, f"{why}: the run folder changed"


def test_each_launch_that_ran_is_recorded_and_the_first_shows_how_it_began(tiny_overrides, tmp_path):
    run = tmp_path / "runs" / "y"
    for steps in (2, 4):
        proc = train([*tiny_overrides, f"run.dir={run}", f"train.max_steps={steps}"], tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    launches = read_launches(run)
    assert [launch["resumed_from_step"] for launch in launches] == [0, 2]
    assert "train.max_steps=2" in launches[0]["overrides"]
    assert "train.max_steps=4" in launches[1]["overrides"]
    assert all(launch["precision"] in ("fp32", "bf16") and launch["precision_reason"] for launch in launches)
    assert "train.max_steps=2" in load_run(run).overrides  # compare_runs: how the run began
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == [1, 2, 3, 4]
