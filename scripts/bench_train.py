"""Training speed on this machine: tokens/s, MFU and peak memory of the real loop for the tiny,
small and llama2c_15m presets; gradient checkpointing's memory/throughput trade for llama2c_15m
(seq 256, batch 32); and the loop's overhead over a bare forward/backward/AdamW step.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_train.py            # everything
    .venv/bin/python scripts/bench_train.py --only overhead --threads 2

Every measurement runs in its own child process, so peak RSS (ru_maxrss, which never goes down)
belongs to that measurement alone. The loop runs on the synthetic corpus with tokenizer bpe_4k
(built on first use under data/); the bare step uses random tokens of the same shape. Figures
are printed as a Markdown table for BENCHMARKS.md, with the load average next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def model_config(preset: str):
    """configs/model/<preset>.yaml as a LlamaConfig; "<preset>:<vocab>" overrides vocab_size."""
    from omegaconf import OmegaConf

    from tinyllama.model import LlamaConfig

    name, _, vocab = preset.partition(":")
    yaml = OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")
    if vocab:
        yaml.vocab_size = int(vocab)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LlamaConfig), yaml))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_loop(preset: str, batch: int, seq: int, steps: int, gc: bool) -> dict:
    """The real loop (run_training) for `steps` steps; tok/s and MFU of its last log window."""
    from tinyllama.config import CheckpointConfig, EvalConfig, JobConfig, RunConfig, SampleConfig, TrainConfig
    from tinyllama.train.loop import run_training

    with tempfile.TemporaryDirectory() as tmp:
        job = JobConfig(
            model=model_config(preset),
            train=TrainConfig(
                max_steps=steps,
                batch_size=batch,
                seq_len=seq,
                precision="fp32",
                grad_checkpointing=gc,
                log_every=steps // 2,
            ),
            checkpoint=CheckpointConfig(every=10**9),
            eval=EvalConfig(every=10**9, batches=1),
            run=RunConfig(dir=tmp, device="cpu"),
            sample=SampleConfig(num_samples=1, max_new_tokens=1),
        )
        run_training(job)
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "tok_per_s" in x][-1]  # the second half: warm-up excluded
    return {"tok_per_s": last["tok_per_s"], "mfu": last.get("mfu"), "peak_rss_mb": peak_rss_mb()}


def child_bare(preset: str, batch: int, seq: int, steps: int, gc: bool) -> dict:
    """forward with the loss (the loop's call: chunked under checkpointing), backward, AdamW step,
    zero_grad: nothing else."""
    import torch

    from tinyllama.model import LlamaForCausalLM

    cfg = model_config(preset)
    model = LlamaForCausalLM(cfg)
    model.model.gradient_checkpointing = gc
    model.chunked_loss = gc  # as train/build.py pairs them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    base = peak_rss_mb()
    warmup = max(1, steps // 2)
    for i in range(steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = model(x[:, :-1], shift_labels=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tok_s = (steps - warmup) * batch * seq / (time.perf_counter() - t0)
    return {"tok_per_s": tok_s, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base}


def measure(kind: str, preset: str, batch: int, seq: int, steps: int, gc: bool, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        preset,
        str(batch),
        str(seq),
        str(steps),
        str(int(gc)),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def bench_presets(args) -> None:
    print(
        f"\n### The loop per preset (batch {args.batch} x seq {args.seq}, fp32, "
        f"{args.threads} thread(s); {load()})\n"
    )
    from tinyllama.inspection import flops_per_token
    from tinyllama.train.throughput import measured_cpu_flops

    # One peak for every row, measured here (best of 50): each child's own figure is measured
    # under whatever load that moment had, which made MFU jump between presets.
    peak = measured_cpu_flops(repeats=50)
    print(f"fp32 matmul peak (1024^3, best of 50): {peak / 1e9:.1f} GFLOP/s\n")
    print("| model | tokens/s | training GFLOP/s | MFU (of that peak) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for preset in ("tiny", "small", "llama2c_15m"):
        r = measure("loop", preset, args.batch, args.seq, args.steps, False, args.threads)
        flops = r["tok_per_s"] * flops_per_token(model_config(preset), args.seq)["training"]
        print(
            f"| {preset} | {r['tok_per_s']:.0f} | {flops / 1e9:.1f} | {100 * flops / peak:.0f}% | "
            f"{r['peak_rss_mb']:.0f} |",
            flush=True,
        )


def bench_checkpointing(args) -> None:
    print(
        f"\n### Gradient checkpointing, llama2c_15m, batch 32 x seq 256, fp32, bare step "
        f"({args.threads} thread(s); {load()})\n"
    )
    print("| model, grad checkpointing | tokens/s | peak RSS (MB) | RSS before the first step (MB) |")
    print("|---|---|---|---|")
    # With checkpointing on, the model also computes the loss in chunks (never the 1 GB of
    # 32000-token logits at this batch); with a 512-token vocabulary the head hardly matters, so
    # those rows show what checkpointing does to the layers alone.
    for preset in ("llama2c_15m", "llama2c_15m:512"):
        rows = {}
        for gc in (False, True):
            r = rows[gc] = measure("bare", preset, 32, 256, args.gc_steps, gc, args.threads)
            print(
                f"| {preset} {'on' if gc else 'off'} | {r['tok_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['rss_before_mb']:.0f} |",
                flush=True,
            )
        off, on = rows[False], rows[True]
        act = lambda r: r["peak_rss_mb"] - r["rss_before_mb"]  # noqa: E731  (training-time growth)
        print(
            f"\n{preset}: peak RSS {100 * (1 - on['peak_rss_mb'] / off['peak_rss_mb']):.0f}% lower "
            f"(growth during training {100 * (1 - act(on) / act(off)):.0f}% lower), "
            f"throughput {100 * (1 - on['tok_per_s'] / off['tok_per_s']):.0f}% lower\n"
        )


def bench_overhead(args) -> None:
    print(
        f"\n### Loop overhead over a bare step (best of {args.repeats}, interleaved; "
        f"{args.threads} thread(s); {load()})\n"
    )
    print("| model | batch x seq | bare tokens/s | loop tokens/s | overhead |")
    print("|---|---|---|---|---|")
    for preset, batch, seq in (("tiny", args.batch, args.seq), ("small", args.batch, args.seq)):
        bare, loop = 0.0, 0.0
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            bare = max(
                bare, measure("bare", preset, batch, seq, args.steps, False, args.threads)["tok_per_s"]
            )
            loop = max(
                loop, measure("loop", preset, batch, seq, args.steps, False, args.threads)["tok_per_s"]
            )
        print(
            f"| {preset} | {batch} x {seq} | {bare:.0f} | {loop:.0f} | {100 * (bare / loop - 1):+.1f}% |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["presets", "checkpointing", "overhead"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per loop measurement (half are warm-up)")
    p.add_argument("--gc-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        kind, preset, batch, seq, steps, gc = args.child
        fn = child_loop if kind == "loop" else child_bare
        print(json.dumps(fn(preset, int(batch), int(seq), int(steps), bool(int(gc)))))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, no GPU")
    for name, fn in (
        ("presets", bench_presets),
        ("checkpointing", bench_checkpointing),
        ("overhead", bench_overhead),
    ):
        if args.only in (None, name):
            fn(args)


if __name__ == "__main__":
    main()
