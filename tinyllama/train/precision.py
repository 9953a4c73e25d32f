"""Mixed precision: choose the compute dtype, the autocast context and the GradScaler.

    auto -> on a GPU: bf16 autocast where it is supported (Ampere and newer), fp16 + GradScaler
            on older GPUs;
            on a CPU: bf16 autocast where the CPU multiplies bf16 natively (AVX512_BF16 or AMX,
            confirmed by a sub-second matmul probe), fp32 otherwise. Without those instructions
            bf16 is emulated and far slower than fp32, so the choice must follow the machine.
Weights and optimizer state stay in float32 in every mode; autocast only lowers the matmuls.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import ContextManager, Tuple

import torch

from tinyllama.config import DTYPES, PRECISIONS, canonical_dtype, precision_problem
from tinyllama.errors import ConfigError
from tinyllama.train.throughput import measured_cpu_flops

# bf16 must beat fp32 on the probe's matmul by this factor before `auto` picks it: the rest of a
# training step (norms, softmax, the optimizer) does not speed up, so a marginal matmul gain
# would be lost, and a probe slower than fp32 means the instructions are present but emulated.
MIN_BF16_MATMUL_SPEEDUP = 1.5


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run. `name` is "fp32", "bf16" or "fp16"; `reason` says why
    (printed in the run's first line and kept in summary.json)."""

    name: str
    device_type: str
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, DTYPES[self.name])

    def autocast(self) -> ContextManager:
        """Context for forward passes (training and evaluation); a no-op in fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed only for fp16 (its 5-bit exponent underflows small gradients);
        a disabled scaler passes everything through, so the loop has one code path."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def cpu_bf16_instructions() -> Tuple[str, ...]:
    """The native bf16 matmul instruction sets this CPU reports to torch (empty: none)."""
    found = []
    if torch.cpu._is_avx512_bf16_supported():
        found.append("avx512_bf16")
    if torch.cpu._is_amx_tile_supported():
        found.append("amx")
    return tuple(found)


def bf16_matmul_speedup(n: int = 512, repeats: int = 5) -> float:
    """bf16 / fp32 matmul FLOP/s on this CPU (an n x n product, best of `repeats`: a fraction of a
    second where bf16 is native)."""
    return measured_cpu_flops(n, repeats, torch.bfloat16) / measured_cpu_flops(n, repeats, torch.float32)


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> Tuple[bool, str]:
    """(True if bf16 autocast is worth it on this CPU, the reason in words). The capability
    flags decide first (no probe where they are missing: emulated bf16 would take seconds);
    where they are present a short probe confirms that bf16 really multiplies faster."""
    capability = torch.backends.cpu.get_cpu_capability()
    instructions = cpu_bf16_instructions()
    if not instructions:
        return False, (
            f"CPU ({capability}) has no native bf16 matmul (no AVX512_BF16 or AMX): "
            "bf16 would be emulated, slower than fp32"
        )
    speedup = bf16_matmul_speedup()
    if speedup < MIN_BF16_MATMUL_SPEEDUP:
        return False, (
            f"CPU reports {'+'.join(instructions)} but a bf16 matmul ran only "
            f"{speedup:.2f}x fp32 (< {MIN_BF16_MATMUL_SPEEDUP}x)"
        )
    return True, f"CPU multiplies bf16 natively ({'+'.join(instructions)}, matmul {speedup:.1f}x fp32)"


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Turn train.precision ("auto", "fp32", "bf16", "fp16", or a long name such as "bfloat16")
    into a Precision for `device`."""
    name = canonical_dtype(requested)
    if name not in PRECISIONS:
        raise ConfigError(precision_problem(requested))
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if name != "auto":
        reason = "train.precision=" + requested
        if name == "bf16" and device.type == "cpu" and not cpu_bf16_instructions():
            reason += " (this CPU emulates bf16: expect it to be slower than fp32)"
        return Precision(name, device.type, reason)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "cuda", "auto: the GPU supports bf16")
        return Precision("fp16", "cuda", "auto: the GPU lacks bf16, fp16 with loss scaling")
    if device.type == "cpu":
        native, why = cpu_native_bf16()
        return Precision("bf16" if native else "fp32", "cpu", "auto: " + why)
    return Precision("fp32", device.type, f"auto: fp32 on {device.type}")
