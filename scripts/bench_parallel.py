"""Training state per rank under DDP and FSDP2 on CPU (gloo), measured, with the step time.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_parallel.py
    flock /tmp/bench.lock .venv/bin/python scripts/bench_parallel.py --model llama2c_15m --procs 1 2 4

For each strategy (ddp: DistributedDataParallel; fsdp: FSDP2's `fully_shard` on every decoder
layer and on the root) and each process count, N processes on this machine (gloo, loopback)
train the preset with AdamW on random tokens for --steps steps (batch --batch x --seq per rank,
float32). Then every rank measures what it holds from the tensors' storage: its parameters, their
gradients and AdamW's moments (the local shards of FSDP's DTensors, whole tensors under DDP),
and rank 0 prints the mean over ranks beside what `tinyllama.inspection.per_device_memory`
predicts for the weights, and the median step time. One process runs the plain model.

With N processes sharing the machine's cores the step times compare strategies at equal N, not
process counts: on 2 cores, 4 processes time-share.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from tinyllama.inspection import per_device_memory
from tinyllama.model import LlamaConfig, LlamaForCausalLM
from tinyllama.train.parallel import apply_fsdp

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "model"


def load_config(name: str) -> LlamaConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(LlamaConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))
    return OmegaConf.to_object(cfg)


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of the part of `t` this rank holds (a DTensor's local shard, else the tensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def worker(rank: int, world: int, strategy: str, args: argparse.Namespace, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = load_config(args.model)
    model = LlamaForCausalLM(config)
    train_model = model
    if world > 1 and strategy == "ddp":
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    elif world > 1 and strategy == "fsdp":  # as train.parallel=fsdp shards it (fp32 here)
        apply_fsdp(model, None, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    times: List[float] = []
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
        start = time.perf_counter()
        loss = train_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients to measure them
        times.append(time.perf_counter() - start)
    held = {
        "parameters": sum(_local_bytes(p) for p in model.parameters()),
        "gradients": sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "adamw": sum(
            _local_bytes(v) for state in optimizer.state.values() for k, v in state.items() if k != "step"
        ),
        "step_s": statistics.median(times[1:] or times),
    }
    if world > 1:
        gathered: List[Dict[str, float]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, held)
    else:
        gathered = [held]
    if rank == 0:
        out.put({k: statistics.mean(h[k] for h in gathered) for k in held})
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="a preset of configs/model")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    config = load_config(args.model)
    print(
        f"{args.model}: {LlamaForCausalLM(config).num_parameters():,} parameters, float32, AdamW, "
        f"batch {args.batch} x {args.seq} per rank, {args.steps} steps, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    print(
        "| strategy | processes | parameters / rank | gradients / rank | AdamW state / rank "
        "| vs 1 process | predicted weights / rank | step (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    context = mp.get_context("spawn")
    single = None
    for strategy in ("ddp", "fsdp"):
        for n in args.procs:
            out = context.SimpleQueue()
            mp.start_processes(
                worker, args=(n, strategy, args, free_port(), out), nprocs=n, start_method="spawn"
            )
            r = out.get()
            total = r["parameters"] + r["gradients"] + r["adamw"]
            single = single or total
            predicted = per_device_memory(config, strategy, devices=n, seq_len=8)["weights"]
            mib = 2**20
            print(
                f"| {strategy} | {n} | {r['parameters'] / mib:.2f} MiB | {r['gradients'] / mib:.2f} MiB "
                f"| {r['adamw'] / mib:.2f} MiB | {total / single:.2f}x | {predicted / mib:.2f} MiB "
                f"| {r['step_s']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
