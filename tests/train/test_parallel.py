"""FSDP2, tensor parallelism and sharded (DCP) checkpoints on gloo processes under torchrun,
each against one process that reads the same global batches."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.test_processes import REPO, logged, train_command, validation_tokens
from tinyllama.checkpoint import DCP, LATEST, WEIGHTS, load_checkpoint, load_for_inference
from tinyllama.cli import job_config_args
from tinyllama.config import validate
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.export import export_hf, import_hf
from tinyllama.train.loop import run_training
from tinyllama.train.parallel import Parallelism

pytestmark = pytest.mark.slow

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")


def torchrun(job, folder: Path, processes: int, script=None) -> str:
    """Launch `job` on `processes` gloo processes; their output (the run must succeed)."""
    launcher = (*TORCHRUN, f"--nproc_per_node={processes}")
    cmd = train_command(job, folder, launcher)
    if script is not None:
        cmd = [*launcher, str(script), *job_config_args(job, folder)]
    out = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout + out.stderr


def short_job(tiny_job, tmp_path, name: str, **train):
    """tiny_job for 4 steps of a constant learning rate (a run stopped early follows the same
    rates), checkpoints and evaluation every 2 steps over the whole validation split in windows
    that two data-parallel ranks split evenly (so their blocks together are one process's)."""
    job = copy.deepcopy(tiny_job)
    job.train.max_steps, job.train.batch_size = 4, 4
    job.optim.schedule, job.optim.warmup_steps = "constant", 2
    job.checkpoint.every = job.eval.every = 2
    job.eval.batches, job.sample.max_new_tokens = 0, 4
    val_tokens = validation_tokens(job)
    job.train.seq_len = next(t for t in range(32, 16, -1) if val_tokens // (t + 1) % 2 == 0)
    for key, value in train.items():
        setattr(job.train, key, value)
    job.run.dir = str(tmp_path / name)
    return job


def assert_same_training(a: Path, b: Path, steps) -> None:
    """Runs a and b took the same steps, up to float32 rounding of sums taken in another order.
    Before any update the runs hold the same weights, so the step-1 gradient norm differs only
    by that rounding (~1e-7 relative per addition over a few hundred terms, far below rtol
    1e-5). After an update AdamW turns the rounding on an element whose gradient is ~0 into a
    step of either sign, up to lr; the loss moves by the gradient times that step, ~0 (so the
    losses and validation losses keep to rtol 1e-5), while the gradient norm moves with the
    curvature times it, which no rounding argument bounds: later norms are not compared."""
    la, lb = logged(a, "loss"), logged(b, "loss")
    assert all(s in la and s in lb for s in steps)
    torch.testing.assert_close([la[s] for s in steps], [lb[s] for s in steps], rtol=1e-5, atol=0)
    torch.testing.assert_close(logged(a, "grad_norm")[1], logged(b, "grad_norm")[1], rtol=1e-5, atol=0)
    va, vb = logged(a, "val_loss"), logged(b, "val_loss")
    shared = [s for s in steps if s in va and s in vb]
    assert shared
    torch.testing.assert_close([va[s] for s in shared], [vb[s] for s in shared], rtol=1e-5, atol=0)


def assert_close_weights(a: Path, b: Path, bound: float) -> None:
    wa, wb = load_checkpoint(a).model_state, load_checkpoint(b).model_state
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= bound


@pytest.fixture
def reference(tiny_job, tmp_path):
    """One process, grad_accum=2: the global batch of 2 data-parallel ranks, uninterrupted."""
    job = short_job(tiny_job, tmp_path, "one", grad_accum=2)
    run_training(job)
    return Path(job.run.dir)


def test_fsdp_on_two_processes_trains_like_one_process_with_twice_the_accumulation(
    tiny_job, tmp_path, reference
):
    # Recomputing each layer in backward (its weights gathered again) changes no number.
    fsdp = short_job(tiny_job, tmp_path, "fsdp", parallel="fsdp", grad_checkpointing=True)
    out = torchrun(fsdp, tmp_path, 2)
    assert "parallel: fsdp over 2 processes, mesh (dp=2)" in out
    assert "4 sequences x 1 accumulation x 2 ranks = 8 sequences" in out
    run = Path(fsdp.run.dir)
    assert_same_training(run, reference, [1, 2, 3, 4])
    # Each rank wrote its own shards; loading consolidates them (every stage loads this way).
    step = run / "checkpoints" / "step_4"
    assert not (step / WEIGHTS).exists()
    assert {p.name for p in (step / DCP).iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert load_checkpoint(run).sharded
    assert_close_weights(run, reference, 2 * fsdp.optim.lr * fsdp.train.max_steps)
    assert (run / "samples.txt").read_text().strip()  # rank 0 sampled from the gathered weights
    # What evaluate, sample, chat, export and serve start from; exported, the same tensors.
    ckpt, model, _, _ = load_for_inference(fsdp)
    _, exported = import_hf(export_hf(model, tmp_path / "hf"))
    assert exported.keys() == ckpt.model_state.keys()
    assert all(torch.equal(exported[k], ckpt.model_state[k]) for k in exported)


def test_tensor_parallel_on_two_processes_trains_like_one_process(tiny_job, tmp_path):
    single = short_job(tiny_job, tmp_path, "one")
    tp = short_job(tiny_job, tmp_path, "tp", tp=2)
    out = torchrun(tp, tmp_path, 2)
    assert "parallel: tp over 2 processes, mesh (dp=1 x tp=2)" in out
    assert "4 sequences x 1 accumulation x 1 ranks = 4 sequences" in out  # both read one batch
    run_training(single)
    run, one = Path(tp.run.dir), Path(single.run.dir)
    assert_same_training(run, one, [1, 2, 3, 4])
    assert_close_weights(run, one, 2 * tp.optim.lr * tp.train.max_steps)


def test_data_2_by_tensor_2_on_four_processes_trains_like_one_process(tiny_job, tmp_path, reference):
    mesh = short_job(tiny_job, tmp_path, "mesh", parallel="fsdp", tp=2)
    out = torchrun(mesh, tmp_path, 4)
    assert "parallel: fsdp+tp over 4 processes, mesh (dp=2 x tp=2)" in out
    run = Path(mesh.run.dir)
    assert_same_training(run, reference, [1, 2, 3, 4])
    assert_close_weights(run, reference, 2 * mesh.optim.lr * mesh.train.max_steps)


def resume_copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_sharded_save_on_two_processes_resumes_on_one_and_on_two(tiny_job, tmp_path, reference):
    """FSDP on 2 stops at step 2 (DCP shards). It continues (a) on 2 processes with FSDP, and
    (b) on 1 process (grad_accum=2) for step 3, whose whole-tensor checkpoint FSDP on 2 then
    takes to step 4: each with the losses of the run that was never interrupted."""
    first = short_job(tiny_job, tmp_path, "first", parallel="fsdp", max_steps=2)
    torchrun(first, tmp_path, 2)
    stopped = Path(first.run.dir)
    assert load_checkpoint(stopped).sharded and load_checkpoint(stopped).step == 2

    on_two = short_job(tiny_job, tmp_path, "on_two", parallel="fsdp")
    resume_copy(stopped, Path(on_two.run.dir))
    out = torchrun(on_two, tmp_path, 2)
    assert "resumed from" in out and "at step 2" in out
    assert_same_training(Path(on_two.run.dir), reference, [1, 2, 3, 4])

    on_one = short_job(tiny_job, tmp_path, "on_one", grad_accum=2, max_steps=3)
    resume_copy(stopped, Path(on_one.run.dir))
    run_training(on_one)
    assert not load_checkpoint(on_one.run.dir).sharded  # one process writes whole tensors
    back = short_job(tiny_job, tmp_path, "on_one", parallel="fsdp")
    torchrun(back, tmp_path, 2)
    assert_same_training(Path(back.run.dir), reference, [1, 2, 3, 4])
    assert sorted(logged(Path(back.run.dir), "loss")) == [1, 2, 3, 4]  # no step twice or missing

    # A damaged shard is refused with one message naming it, before anything is written.
    for damage, message in (("truncate", "is truncated"), ("remove", "is missing __1_0.distcp")):
        broken = resume_copy(stopped, tmp_path / f"broken_{damage}")
        shard = broken / "checkpoints" / "step_2" / DCP / "__1_0.distcp"
        if damage == "truncate":
            shard.write_bytes(shard.read_bytes()[:100])
        else:
            shard.unlink()
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(broken)
        job = short_job(tiny_job, tmp_path, f"broken_{damage}", grad_accum=2)
        before = {p: p.stat().st_mtime_ns for p in broken.rglob("*")}
        with pytest.raises(CheckpointError, match=message):
            run_training(job)
        assert {p: p.stat().st_mtime_ns for p in broken.rglob("*")} == before


def test_ddp_on_two_then_fsdp_on_two_then_one_process_continue_one_run(tiny_job, tmp_path, reference):
    """The issue's chain: whole tensors from DDP into FSDP's shards, then shards into one process."""
    ddp = short_job(tiny_job, tmp_path, "chain", max_steps=2)
    torchrun(ddp, tmp_path, 2)
    assert not load_checkpoint(ddp.run.dir).sharded
    fsdp = short_job(tiny_job, tmp_path, "chain", parallel="fsdp", max_steps=3)
    assert "resumed from" in torchrun(fsdp, tmp_path, 2)
    assert load_checkpoint(fsdp.run.dir).sharded
    run_training(short_job(tiny_job, tmp_path, "chain", grad_accum=2))
    run = Path(ddp.run.dir)
    assert sorted(logged(run, "loss")) == [1, 2, 3, 4]
    assert_same_training(run, reference, [1, 2, 3, 4])


SLOW_SAVE = """
import os, runpy, sys, time
from pathlib import Path
import torch.distributed.checkpoint as dcp

save = dcp.save
MARKS = Path(sys.argv[0]).with_name("saving")


def slow(*args, **kwargs):
    out = save(*args, **kwargs)
    if "step_4" in str(kwargs["checkpoint_id"]):  # the shards are written, the folder not renamed
        (MARKS / str(os.getpid())).touch()
        time.sleep(600)
    return out


dcp.save = slow
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_kill_9_during_a_sharded_save_leaves_latest_complete(tiny_job, tmp_path):
    job = short_job(tiny_job, tmp_path, "killed", parallel="fsdp", max_steps=6)
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(train=str(REPO / "train.py")))
    cmd = [*TORCHRUN, "--nproc_per_node=2", str(script), *job_config_args(job, tmp_path)]
    marks = tmp_path / "saving"  # a file per rank, named by its pid, once inside the save
    marks.mkdir()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(marks.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(marks.iterdir())) == 2, "the run never reached the save of step 4"
    finally:  # torchrun, and both ranks (each in a session of its own), mid-save
        for pid in [proc.pid, *(int(p.name) for p in marks.iterdir())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    checkpoints = Path(job.run.dir) / "checkpoints"
    assert list(checkpoints.glob(".tmp-step_4-*")), "the kill did not land inside the save"
    assert (checkpoints / LATEST).read_text().strip() == "step_2"
    assert load_checkpoint(job.run.dir).step == 2  # complete: every shard there, consolidated

    on_one = short_job(tiny_job, tmp_path, "killed", grad_accum=2, max_steps=6)
    run_training(on_one)  # resumes at step 2 on one process; the dead writer's folder goes
    assert sorted(logged(Path(job.run.dir), "loss")) == [1, 2, 3, 4, 5, 6]
    assert not list(checkpoints.glob(".tmp-*")) and load_checkpoint(job.run.dir).step == 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_launches_with_nnodes_2_form_one_job(tiny_job, tmp_path):
    """What two machines run, on localhost: each node one process, met by c10d rendezvous."""
    job = short_job(tiny_job, tmp_path, "nodes", max_steps=2)
    node = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        "--rdzv_id=tinyllama-nodes",
    )
    launches = [
        subprocess.Popen(
            train_command(job, tmp_path, node),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], "\n".join(o[-3000:] for o in outs)
    joined = "".join(outs)
    assert "parallel: ddp over 2 processes, mesh (dp=2)" in joined
    assert "4 sequences x 1 accumulation x 2 ranks = 8 sequences" in joined
    assert sorted(logged(Path(job.run.dir), "loss")) == [1, 2]  # one job, one writer


@pytest.mark.parametrize(
    "world, train, message",
    [
        (1, dict(parallel="fsdp"), "train.parallel=fsdp shards over several processes, but this is one"),
        (1, dict(tp=2), "train.tp=2 splits layers over 2 processes, but this is one"),
        (3, dict(tp=2), "train.tp=2 does not divide the 3 processes"),
        (
            4,
            dict(tp=2),
            "leaves a data-parallel degree of 2, which is sharded with FSDP: add train.parallel=fsdp",
        ),
    ],
)
def test_parallelism_the_processes_cannot_run_is_refused(tiny_job, world, train, message):
    for key, value in train.items():
        setattr(tiny_job.train, key, value)
    validate(tiny_job)  # the config alone is fine
    with pytest.raises(ConfigError, match=message):
        Parallelism.plan(tiny_job, world)


@pytest.mark.parametrize(
    "train, message",
    [
        (dict(tp=3), "train.tp=3 does not divide model.num_attention_heads=4"),
        (dict(tp=0), "train.tp=0: must be >= 1"),
        (dict(parallel="zero3"), "train.parallel='zero3': choose ddp or fsdp"),
        (dict(parallel="fsdp", precision="fp16"), "set train.precision=bf16 or fp32"),
        (dict(parallel="fsdp", objective="grpo"), "grpo runs with train.parallel=ddp"),
    ],
)
def test_parallel_settings_the_config_rules_out_are_refused(tiny_job, train, message):
    for key, value in train.items():
        setattr(tiny_job.train, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(tiny_job)


def test_fsdp_on_one_process_is_refused_before_anything_is_written(tiny_job):
    tiny_job.train.parallel = "fsdp"
    with pytest.raises(ConfigError, match="launch with torchrun --nproc_per_node=N"):
        run_training(tiny_job)
    assert not Path(tiny_job.run.dir).exists()
