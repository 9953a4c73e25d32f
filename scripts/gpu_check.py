"""Check a new GPU box: every CUDA path of the framework, one PASS / FAIL / SKIP line each.

    python scripts/gpu_check.py                  # or: make gpu-check
    python scripts/gpu_check.py --only cuda,sdpa,throughput
    python scripts/gpu_check.py --device cpu     # the same checks on CPU (what can run there)

Checks (in order; each runs the library's real code, mostly through the training loop):
    cuda                CUDA torch is installed and sees a GPU
    train_bf16          bf16 autocast training steps: finite, falling losses
    train_fp16          fp16 autocast + GradScaler: finite, falling losses, scaler active
    fused_adamw         the optimizer is the fused AdamW kernel, equal to the reference one
    sdpa                scaled_dot_product_attention runs the flash and memory-efficient kernels
    compile             torch.compile of the model: same losses as eager, to the dtype's rounding
    grad_checkpointing  recomputed activations give the same losses
    ddp                 torchrun on all local GPUs (NCCL; gloo with --device cpu) equals one process
                        with the same global batch
    fsdp                FSDP2 (train.parallel=fsdp, bf16 gathers) on all local GPUs equals one
                        process with the same global batch; its sharded checkpoint consolidates
    tp                  tensor parallelism (train.tp=2) on 2 GPUs equals one process
    resume              a run stopped and resumed logs the same losses as one never stopped
    throughput          tokens/s and MFU of llama2c_15m and llama2c_110m (bf16, compile)
Exit status 0 when nothing failed. Work files go to a temporary folder (--workdir to keep them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from tinyllama.cli import compose_job, job_config_args  # noqa: E402
from tinyllama.train.loop import run_training  # noqa: E402


class Skip(Exception):
    """The check does not apply on this machine; the message says why."""


class Context:
    def __init__(self, device: str, workdir: Path, steps: int):
        self.device, self.workdir, self.steps = device, workdir, steps
        self.cuda = device == "cuda"
        self.runs = 0

    def job(self, *overrides: str):
        """A JobConfig for a short run of the tiny model on a small synthetic corpus."""
        self.runs += 1
        return compose_job(
            [
                "model=tiny",
                "tokenizer=bpe_512",
                "model.vocab_size=512",
                "data.num_docs=2000",
                f"data.root={self.workdir / 'data'}",
                f"run.dir={self.workdir / f'run{self.runs}'}",
                f"run.device={self.device}",
                f"train.max_steps={self.steps}",
                "train.batch_size=8",
                "train.seq_len=64",
                "train.log_every=1",
                "eval.every=1000",
                "eval.batches=2",
                "checkpoint.every=1000",
                "sample.num_samples=1",
                "sample.max_new_tokens=4",
                "optim.lr=3e-3",
                "optim.warmup_steps=2",
                *overrides,
            ]
        )

    def train(self, job) -> Dict[int, dict]:
        """Run `job` with its console output kept in the run folder; {step: training line}."""
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                run_training(job)
        finally:
            Path(job.run.dir).mkdir(parents=True, exist_ok=True)
            (Path(job.run.dir) / "console.txt").write_text(log.getvalue())
        return metrics(Path(job.run.dir))

    def need_cuda(self, what: str) -> None:
        if not self.cuda:
            raise Skip(f"{what}: needs a CUDA device (this is a --device cpu run)")


def metrics(run_dir: Path) -> Dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}


def losses(lines: Dict[int, dict]) -> List[float]:
    return [lines[s]["loss"] for s in sorted(lines)]


def learns(lines: Dict[int, dict]) -> str:
    values = losses(lines)
    if not all(math.isfinite(v) for v in values):
        raise AssertionError(f"non-finite losses: {values}")
    if not values[-1] < values[0]:
        raise AssertionError(f"the loss did not fall: {values[0]:.4f} -> {values[-1]:.4f}")
    return f"{len(values)} steps, loss {values[0]:.3f} -> {values[-1]:.3f}"


def same_losses(a: Dict[int, dict], b: Dict[int, dict], rtol: float) -> float:
    """Largest relative difference of the two runs' losses; raises above rtol."""
    la, lb = losses(a), losses(b)
    if len(la) != len(lb):
        raise AssertionError(f"{len(la)} vs {len(lb)} logged steps")
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb))
    if worst > rtol:
        raise AssertionError(f"losses differ by {worst:.2e} relative (allowed {rtol:.0e})")
    return worst


def low_precision(ctx: Context) -> str:
    """What train.precision=auto trains in on this device (bf16 on a modern GPU)."""
    from tinyllama.train.precision import resolve_precision

    return resolve_precision("auto", torch.device(ctx.device)).name


def loss_rtol(precision: str) -> float:
    """How far two mathematically equal runs may drift over the check's few steps: bf16 keeps
    8 mantissa bits (rounding ~4e-3 per product), fp32 24 bits (~6e-8, summed over thousands)."""
    return 3e-2 if precision in ("bf16", "fp16") else 1e-4


# ---- the checks -------------------------------------------------------------------------------
def check_cuda(ctx: Context) -> str:
    ctx.need_cuda("the CUDA check")
    if not torch.cuda.is_available():
        raise AssertionError(
            f"torch {torch.__version__} sees no GPU (CUDA build: "
            f"{torch.version.cuda}); install a CUDA build: make demo TORCH=torch"
        )
    name, cap = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    return (
        f"{torch.cuda.device_count()} x {name}, compute capability {cap[0]}.{cap[1]}, "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    )


def check_train_bf16(ctx: Context) -> str:
    if ctx.cuda and not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bf16 (train.precision=auto uses fp16 there)")
    return learns(ctx.train(ctx.job("train.precision=bf16")))


def check_train_fp16(ctx: Context) -> str:
    ctx.need_cuda("fp16 with a GradScaler")
    job = ctx.job("train.precision=fp16")
    detail = learns(ctx.train(job))
    console = (Path(job.run.dir) / "console.txt").read_text()
    if "precision: fp16" not in console:
        raise AssertionError("the run did not report fp16")
    return detail + ", GradScaler on"


def check_fused_adamw(ctx: Context) -> str:
    from tinyllama.model import LlamaForCausalLM
    from tinyllama.train.optim import build_optimizer

    job = ctx.job()
    torch.manual_seed(0)
    model = LlamaForCausalLM(job.model).to(ctx.device)
    reference = copy.deepcopy(model)
    fused = build_optimizer(model, job.optim, torch.device(ctx.device))
    if not fused.defaults.get("fused"):
        raise AssertionError("build_optimizer did not choose the fused kernel")
    plain = torch.optim.AdamW(
        reference.parameters(),
        lr=job.optim.lr,
        betas=(job.optim.beta1, job.optim.beta2),
        eps=job.optim.eps,
        weight_decay=0.0,
    )
    for p, q in zip(model.parameters(), reference.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    # Weight decay differs by parameter group; compare on the undecayed update only.
    for group in fused.param_groups:
        group["weight_decay"] = 0.0
    fused.step()
    plain.step()
    worst = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    if worst > 1e-6:
        raise AssertionError(f"fused and reference AdamW differ by {worst:.2e}")
    return f"fused=True, equal to the reference AdamW (max difference {worst:.1e})"


def check_sdpa(ctx: Context) -> str:
    ctx.need_cuda("the flash and memory-efficient SDPA kernels")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tinyllama.model import LlamaForCausalLM

    job = ctx.job()
    model = LlamaForCausalLM(job.model).cuda()
    x = torch.randint(0, job.model.vocab_size, (4, 256), device="cuda")
    ran = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, labels=x).loss.backward()  # raises if the kernel cannot serve the call
        ran.append(backend.name.lower())
    return "forward and backward ran on " + " and ".join(ran)


def check_compile(ctx: Context) -> str:
    precision = low_precision(ctx)
    eager = ctx.train(ctx.job(f"train.precision={precision}"))
    compiled = ctx.train(ctx.job(f"train.precision={precision}", "train.compile=true"))
    worst = same_losses(compiled, eager, loss_rtol(precision))
    return f"{precision}: compiled losses within {worst:.1e} of eager"


def check_grad_checkpointing(ctx: Context) -> str:
    plain = ctx.train(ctx.job("train.precision=fp32"))
    recomputed = ctx.train(ctx.job("train.precision=fp32", "train.grad_checkpointing=true"))
    worst = same_losses(recomputed, plain, loss_rtol("fp32"))
    return f"fp32: losses within {worst:.1e} of the run that stores activations"


def torchrun(ctx: Context, job, processes: int) -> None:
    """`train.py` for `job` on `processes` local processes (one GPU each)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        str(REPO / "train.py"),
        *job_config_args(job, ctx.workdir),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stderr[-2000:]}")


def processes_for(ctx: Context, what: str) -> int:
    """All local GPUs (2 gloo processes with --device cpu); Skip with fewer than 2 GPUs."""
    world = torch.cuda.device_count() if ctx.cuda else 2
    if world < 2:
        raise Skip(f"one GPU: {what} needs two or more (single-GPU runs are the other checks)")
    return world


def check_ddp(ctx: Context) -> str:
    world = processes_for(ctx, "a multi-GPU DDP run")
    ddp = ctx.job("train.precision=fp32")
    single = ctx.job("train.precision=fp32", f"train.grad_accum={world}")
    torchrun(ctx, ddp, world)
    worst = same_losses(metrics(Path(ddp.run.dir)), ctx.train(single), loss_rtol("fp32"))
    backend = "NCCL" if ctx.cuda else "gloo"
    return f"{world} processes ({backend}) log the losses of 1 process x {world} accumulation (within {worst:.1e})"


def check_fsdp(ctx: Context) -> str:
    from tinyllama.checkpoint import load_checkpoint

    world = processes_for(ctx, "FSDP")
    precision = low_precision(ctx)
    fsdp = ctx.job(f"train.precision={precision}", "train.parallel=fsdp")
    single = ctx.job(f"train.precision={precision}", f"train.grad_accum={world}")
    torchrun(ctx, fsdp, world)
    worst = same_losses(metrics(Path(fsdp.run.dir)), ctx.train(single), loss_rtol(precision))
    ckpt = load_checkpoint(fsdp.run.dir, train_state=False)  # consolidated from the shards
    if not ckpt.sharded:
        raise AssertionError(f"{ckpt.path} holds whole tensors, not DCP shards")
    backend = "NCCL" if ctx.cuda else "gloo"
    return (
        f"{world} processes ({backend}, {precision}) log the losses of 1 process x {world} "
        f"accumulation (within {worst:.1e}); the sharded checkpoint consolidates"
    )


def check_tp(ctx: Context) -> str:
    processes_for(ctx, "tensor parallelism")
    tp = ctx.job("train.precision=fp32", "train.tp=2")
    single = ctx.job("train.precision=fp32")
    torchrun(ctx, tp, 2)
    worst = same_losses(metrics(Path(tp.run.dir)), ctx.train(single), loss_rtol("fp32"))
    return f"train.tp=2 on 2 processes logs the losses of 1 process (within {worst:.1e})"


def check_resume(ctx: Context) -> str:
    # A constant schedule, so the stopped run (max_steps = half) follows the same learning rates.
    common = ("optim.schedule=constant", f"train.precision={low_precision(ctx)}")
    straight = ctx.train(ctx.job(*common))
    half = ctx.job(*common, f"train.max_steps={ctx.steps // 2}")
    ctx.train(half)
    resumed_job = copy.deepcopy(half)
    resumed_job.train.max_steps = ctx.steps
    resumed = ctx.train(resumed_job)
    if losses(resumed) != losses(straight):
        worst = same_losses(resumed, straight, float("inf"))
        raise AssertionError(
            f"resumed losses differ from the uninterrupted run by up to "
            f"{worst:.2e} relative (non-deterministic kernels?)"
        )
    return f"stopped at step {ctx.steps // 2}, resumed: {ctx.steps} losses bit-identical"


def check_throughput(ctx: Context) -> str:
    ctx.need_cuda("the GPU throughput check")
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    results = []
    for preset, seq, vocab in (("llama2c_15m", 256, 4096), ("llama2c_110m", 1024, 32000)):
        batch = 64 if memory_gb >= 70 else 16  # micro-batch that fits 80 GB-class and 24 GB GPUs
        job = compose_job(
            [
                f"model={preset}",
                f"model.vocab_size={vocab}",
                "tokenizer=bpe_4k",
                f"data.root={ctx.workdir / 'data4k'}",
                f"run.dir={ctx.workdir / ('tp_' + preset)}",
                "run.device=cuda",
                "train.precision=bf16",
                "train.compile=true",
                f"train.batch_size={batch}",
                f"train.seq_len={seq}",
                "train.max_steps=60",
                "train.log_every=20",
                "eval.every=1000",
                "eval.batches=2",
                "checkpoint.every=1000",
                "sample.num_samples=1",
                "sample.max_new_tokens=4",
            ]
        )
        last = ctx.train(job)[60]  # steps 41-60: compiled and warm
        results.append(
            f"{preset} (batch {batch} x {seq}): {last['tok_per_s']:,.0f} tok/s, "
            f"MFU {100 * last.get('mfu', float('nan')):.1f}%"
        )
    return "; ".join(results)


CHECKS: Dict[str, Callable[[Context], str]] = {
    "cuda": check_cuda,
    "train_bf16": check_train_bf16,
    "train_fp16": check_train_fp16,
    "fused_adamw": check_fused_adamw,
    "sdpa": check_sdpa,
    "compile": check_compile,
    "grad_checkpointing": check_grad_checkpointing,
    "ddp": check_ddp,
    "fsdp": check_fsdp,
    "tp": check_tp,
    "resume": check_resume,
    "throughput": check_throughput,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--only", default="", help="comma-separated checks (default: all)")
    ap.add_argument("--steps", type=int, default=20, help="training steps of each short run")
    ap.add_argument("--workdir", default=None, help="keep work files here (default: a temp folder)")
    args = ap.parse_args(argv)
    chosen = [c for c in args.only.split(",") if c] or list(CHECKS)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        ap.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args.device, Path(args.workdir or tmp).resolve(), args.steps)
        for name in chosen:
            t0 = time.perf_counter()
            try:
                if ctx.cuda and name != "cuda" and not torch.cuda.is_available():
                    raise Skip("no CUDA device is visible (see the cuda check)")
                status, detail = "PASS", CHECKS[name](ctx)
            except Skip as e:
                status, detail = "SKIP", str(e)
            except Exception as e:  # a failed check is reported, and the others still run
                status, detail = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:400]
            counts[status] += 1
            print(f"{status}  {name:<19} {detail}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("gpu check: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
