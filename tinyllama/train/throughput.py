"""Throughput, model FLOPs utilisation (MFU) and peak memory.

MFU = achieved training FLOPs / the device's peak FLOPs, with the training FLOPs per token
from the model's own `flops_per_token` (6N plus the attention term). GPU peaks come from a
table of dense tensor-core figures; on a CPU there is no honest datasheet number, so the peak
is a measured matmul rate in the run's precision (float32, or bfloat16 under bf16 autocast;
measured once per process). CPU MFU is therefore "share of what this CPU reaches on a large
matmul of that dtype", not of a theoretical peak.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from typing import Optional

import torch

# Dense peak FLOP/s per GPU (bf16/fp16 tensor cores, fp32 without TF32). Matched by substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
GPU_PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "A10G": (70e12, 31.2e12),
    "A10": (125e12, 31.2e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(n: int = 1024, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n `dtype` matmul on this CPU with torch's current thread count
    (best of `repeats`, after one warm-up; the best survives other processes'
    load better than the mean, but on a busy machine the figure, and so MFU, is still noisy).
    Repeats stop after a second, so a dtype the CPU emulates costs a few products, not minutes."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, start = float("inf"), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if t0 - start > 1.0:
            break
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Peak FLOP/s of one device for `dtype` matmuls; None for an unknown GPU (MFU not reported)."""
    if device.type == "cpu":  # bf16 autocast: the rate of the bf16 products the step runs
        return measured_cpu_flops(dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (low_precision, fp32) in GPU_PEAK_FLOPS.items():
        if key in name:
            return fp32 if dtype == torch.float32 else low_precision
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


class Throughput:
    """Tokens per second over the window since the last `window()` call.

    tokens_per_step: global tokens per optimizer step (micro-batch x seq x accum x world).
    flops_per_token: training FLOPs per token; peak: per-device peak FLOP/s (None: no MFU).
    """

    def __init__(
        self, tokens_per_step: int, flops_per_token: float, peak: Optional[float], world_size: int
    ) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self._t0 = time.perf_counter()
        self._steps = 0

    def step(self) -> None:
        self._steps += 1

    def window(self) -> dict:
        """{tok_per_s, mfu} since the previous call (mfu is per device, omitted if unknown)."""
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        tok_per_s = self._steps * self.tokens_per_step / elapsed
        self._t0, self._steps = now, 0
        out = {"tok_per_s": tok_per_s}
        if self.peak:
            out["mfu"] = tok_per_s / self.world_size * self.flops_per_token / self.peak
        return out
