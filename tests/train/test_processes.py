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

from tinyllama.checkpoint import load_checkpoint
from tinyllama.cli import job_config_args
from tinyllama.data.loader import TokenStream
from tinyllama.data.pack import packed_dir, read_meta
from tinyllama.tokenizer import ensure_tokenizer
from tinyllama.train.loop import run_training

REPO = Path(__file__).resolve().parents[2]


def train_command(job, folder: Path, launcher=(sys.executable,)) -> list:
    """`train.py` reading `job` as its primary config (schema-checked like configs/train.yaml)."""
    return [*launcher, str(REPO / "train.py"), *job_config_args(job, folder)]


def logged(run_dir: Path, key: str) -> dict:
    """{step: value} of `key` over the lines of metrics.jsonl that have it ({} before it exists)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {m["step"]: m[key] for m in lines if key in m}


def steps_logged(run_dir: Path) -> list:
    return sorted(logged(run_dir, "loss"))


def test_sigterm_saves_exits_cleanly_and_resumes(tiny_job, tmp_path):
    tiny_job.train.max_steps, tiny_job.optim.schedule = 100_000, "constant"  # never ends by itself
    tiny_job.checkpoint.every = tiny_job.eval.every = 50_000
    run_dir = Path(tiny_job.run.dir)
    proc = subprocess.Popen(
        train_command(tiny_job, tmp_path),
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
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


def validation_tokens(job) -> int:
    folder = packed_dir(job.data, ensure_tokenizer(job.tokenizer, job.data))
    return TokenStream(folder, read_meta(folder), "val").tokens


def test_ddp_two_processes_equal_one_process_with_twice_the_accumulation(tiny_job, tmp_path):
    tiny_job.train.max_steps, tiny_job.train.batch_size = 4, 4
    # The whole validation split, in windows that split evenly between 2 ranks: then the ranks'
    # blocks together are exactly the windows one process evaluates.
    tiny_job.eval.batches, tiny_job.sample.max_new_tokens = 0, 4
    val_tokens = validation_tokens(tiny_job)
    tiny_job.train.seq_len = next(t for t in range(32, 16, -1) if val_tokens // (t + 1) % 2 == 0)
    ddp, single = copy.deepcopy(tiny_job), copy.deepcopy(tiny_job)
    ddp.run.dir, single.run.dir, single.train.grad_accum = str(tmp_path / "ddp"), str(tmp_path / "one"), 2

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out = subprocess.run(
        train_command(ddp, tmp_path, torchrun), cwd=REPO, text=True, capture_output=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run_training(single)

    # rank 1 read the other half of each global batch: 2 ranks x 4 = 1 rank x 4 x 2 accumulation
    assert "4 sequences x 1 accumulation x 2 ranks = 8 sequences" in out.stdout + out.stderr
    a, b = Path(ddp.run.dir), Path(single.run.dir)
    assert sorted(logged(a, "loss")) == [1, 2, 3, 4]  # one writer: rank 0
    # What is compared must not be chaotic. Weights after AdamW steps are: Adam divides by
    # sqrt(v), so an element whose gradient is ~0 turns float32 reduction-order noise (the two
    # runs sum the same terms in another order) into an update of either sign, up to lr. Losses
    # and the gradient norm are smooth functions of the weights, and such an element's gradient
    # is ~0, so they move only by the rounding of the sums: ~1e-7 relative per addition over
    # a few hundred terms, well below rtol=1e-5. The losses are the mean over both ranks; the
    # step-1 gradient norm is of DDP's averaged gradient, before any update could differ.
    for key in ("loss", "grad_norm", "val_loss"):
        da, db = logged(a, key), logged(b, key)
        assert da.keys() == db.keys() and da, key
        torch.testing.assert_close(list(da.values()), list(db.values()), rtol=1e-5, atol=0, msg=key)
    # Each weight moved by at most lr per step in each run; a rank that skipped the gradient
    # all-reduce or read the wrong half of the batch would already fail the loss check above.
    wa, wb = load_checkpoint(a).model_state, load_checkpoint(b).model_state
    assert wa.keys() == wb.keys()
    bound = 2 * tiny_job.optim.lr * tiny_job.train.max_steps
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= bound
