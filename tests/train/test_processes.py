"""The loop as users launch it: `python train.py` stopped by SIGTERM, and DDP under torchrun."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tinyllama.checkpoint import load_checkpoint
from tinyllama.train.loop import run_training

REPO = Path(__file__).resolve().parents[2]


def train_command(job, folder: Path, launcher=(sys.executable,)) -> list:
    """`train.py` reading `job` as its primary config (schema-checked like configs/train.yaml)."""
    body = OmegaConf.to_yaml(OmegaConf.structured(job))
    (folder / "job.yaml").write_text(
        "defaults:\n  - job_schema\n  - _self_\n" + body
        + f"hydra:\n  run:\n    dir: {job.run.dir}\n  output_subdir: null\n")
    return [*launcher, str(REPO / "train.py"), "--config-dir", str(folder), "--config-name", "job"]


def steps_logged(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.strip() and '"loss"' in line]


def test_sigterm_saves_exits_cleanly_and_resumes(tiny_job, tmp_path):
    tiny_job.train.max_steps, tiny_job.optim.schedule = 100_000, "constant"  # never ends by itself
    tiny_job.checkpoint.every = tiny_job.eval.every = 50_000
    run_dir = Path(tiny_job.run.dir)
    proc = subprocess.Popen(train_command(tiny_job, tmp_path), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(steps_logged(run_dir)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "stopped at step" in out
    stopped = load_checkpoint(run_dir).step
    assert stopped >= 3 and max(steps_logged(run_dir)) == stopped  # the step in flight finished

    tiny_job.train.max_steps = stopped + 2
    run_training(tiny_job)
    assert steps_logged(run_dir) == list(range(1, stopped + 3))  # continues, no gap, no repeat
    assert load_checkpoint(run_dir).step == stopped + 2


def test_ddp_two_processes_equal_one_process_with_twice_the_accumulation(tiny_job, tmp_path):
    tiny_job.train.max_steps, tiny_job.train.batch_size = 4, 4
    tiny_job.eval.batches, tiny_job.sample.max_new_tokens = 2, 4
    ddp, single = copy.deepcopy(tiny_job), copy.deepcopy(tiny_job)
    ddp.run.dir, single.run.dir, single.train.grad_accum = str(tmp_path / "ddp"), str(tmp_path / "one"), 2

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out = subprocess.run(train_command(ddp, tmp_path, torchrun), cwd=REPO, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    run_training(single)

    # rank 1 read the other half of each global batch: 2 ranks x 4 = 1 rank x 4 x 2 accumulation
    assert "4 sequences x 1 accumulation x 2 ranks = 8 sequences" in out.stdout + out.stderr
    assert steps_logged(Path(ddp.run.dir)) == [1, 2, 3, 4]  # one writer: rank 0
    a, b = load_checkpoint(ddp.run.dir).model_state, load_checkpoint(single.run.dir).model_state
    assert a.keys() == b.keys()
    for name in a:  # float32 reductions in another order: agree to rounding, not bit for bit
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
