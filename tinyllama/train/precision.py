"""Mixed precision: choose the compute dtype, the autocast context and the GradScaler.

    auto -> bf16 autocast on GPUs that support it (Ampere and newer), fp16 + GradScaler on
            older GPUs, fp32 on CPU (this CPU path is ~100x slower in bf16 than in fp32).
Weights and optimizer state stay in float32 in every mode; autocast only lowers the matmuls.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

from tinyllama.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run. `name` is "fp32", "bf16" or "fp16"."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self) -> ContextManager:
        """Context for forward passes (training and evaluation); a no-op in fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed only for fp16 (its 5-bit exponent underflows small gradients);
        a disabled scaler passes everything through, so the loop has one code path."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Turn train.precision ("auto", "fp32", "bf16", "fp16") into a Precision for `device`."""
    if requested not in ("auto", *_DTYPES):
        raise ConfigError(f"train.precision={requested!r}: choose auto, fp32, bf16 or fp16")
    if requested == "auto":
        if device.type != "cuda":
            requested = "fp32"
        else:
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return Precision(requested, device.type)
