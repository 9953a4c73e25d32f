"""Bits per byte a recipe reaches in a training budget, on its data's whole validation split.

    flock /tmp/bench.lock python scripts/bench_recipe.py --minutes 6 12            # cpu_quick
    flock /tmp/bench.lock python scripts/bench_recipe.py --steps 1780 --recipe cpu_quick
    python scripts/bench_recipe.py --steps 890 --name tune_b8 -- train.batch_size=8   # a variant
    python scripts/bench_recipe.py --steps 350 --name mark -- train.batch_size=16 optim.lr=5e-4 \
        model.hidden_size=288 model.intermediate_size=768 model.num_hidden_layers=6 \
        model.num_attention_heads=6 model.num_key_value_heads=6 \
        optim.min_lr_ratio=0        # llama2.c's 7M "OG" recipe on this data: the mark

Each budget is its own run, so the schedule ends where the budget does:
`train.py experiment=<recipe> train.max_steps=<steps> run.name=<name>_<steps>` (name
bench_<recipe> unless --name gives one per variant), then `scripts/evaluate.py` on the whole
validation split. --minutes converts to steps with the recipe's step time, measured here on
random tokens as the train loop steps (or given with --steps-per-minute when the machine is busy
and the quiet figure is known). Prints one Markdown row per budget, with the load average,
since other work on the machine stretches the wall time (not the result).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measured_steps_per_minute(recipe: str, extra: list, steps: int = 10) -> float:
    """Steps per minute from the median of `steps` timed optimizer steps of the recipe's model and
    batch on random tokens (after one warm-up step, which also compiles under train.compile=true,
    a cost this rate leaves out): forward, backward, gradient clipping and the fused AdamW step,
    as the train loop runs them on this CPU. The median ignores a step slowed by other work."""
    import torch
    from hydra import compose, initialize_config_dir

    from tinyllama.cli import CONFIG_DIR, to_job
    from tinyllama.model import LlamaForCausalLM
    from tinyllama.train.optim import build_optimizer

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        job = to_job(compose("train", overrides=[f"experiment={recipe}", *extra]))
    model = LlamaForCausalLM(job.model)
    opt = build_optimizer(model, job.optim, torch.device("cpu"))
    step_model = torch.compile(model) if job.train.compile else model
    t = job.train
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    x = torch.randint(0, job.model.vocab_size, (t.batch_size, t.seq_len + 1))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        for _ in range(t.grad_accum):
            (step_model(x[:, :-1], shift_labels=x[:, 1:]).loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 60 / statistics.median(times[1:])


def run(cmd: list) -> str:
    proc = subprocess.run(
        [sys.executable, *cmd],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def bench(recipe: str, steps: int, extra: list, prefix: str = "") -> dict:
    name = f"{prefix or 'bench_' + recipe}_{steps}"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    run(
        [
            "train.py",
            f"experiment={recipe}",
            f"train.max_steps={steps}",
            f"run.name={name}",
            "checkpoint.resume=never",
            *extra,
        ]
    )
    wall = time.perf_counter() - start
    summary = json.loads((REPO / "runs" / name / "summary.json").read_text())
    run(["scripts/evaluate.py", f"run.dir=runs/{name}", "evaluate.plot=false"])
    results = sorted((REPO / "runs" / name / "eval").glob(f"step_{steps}-*.json"))
    ev = json.loads(results[-1].read_text())
    return {
        "name": name,
        "steps": steps,
        "tokens": summary["tokens_seen"],
        "train_s": summary["wall_time_s"],
        "wall_s": wall,
        "load": (load_before + os.getloadavg()[0]) / 2,
        "loss": ev["loss"],
        "bpb": ev["bits_per_byte"],
        "bytes": ev["bytes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="cpu_quick", help="configs/experiment/<recipe>.yaml")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, nargs="+", help="training budgets in minutes")
    budget.add_argument("--steps", type=int, nargs="+", help="training budgets in optimizer steps")
    p.add_argument(
        "--name", default="", help="run folders runs/<name>_<steps> (default bench_<recipe>), one per variant"
    )
    p.add_argument(
        "--steps-per-minute", type=float, help="convert --minutes with this rate instead of measuring it now"
    )
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = p.parse_args()
    steps = args.steps
    if args.minutes:
        rate = args.steps_per_minute or measured_steps_per_minute(args.recipe, args.overrides)
        print(f"{rate:.1f} steps per minute")
        steps = [round(m * rate) for m in args.minutes]
    print(
        "| run | steps | tokens | train time | wall time | load | val loss | bits/byte |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    for n in steps:
        r = bench(args.recipe, n, args.overrides, args.name)
        print(
            f"| {r['name']} | {r['steps']} | {r['tokens'] / 1e6:.2f}M | {r['train_s'] / 60:.1f} min "
            f"| {r['wall_s'] / 60:.1f} min | {r['load']:.1f} | {r['loss']:.4f} | {r['bpb']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
