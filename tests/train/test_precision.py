"""Precision resolution, autocast and the GradScaler switch."""
from __future__ import annotations

import pytest
import torch

from tinyllama.errors import ConfigError
from tinyllama.train.precision import resolve_precision

CPU = torch.device("cpu")


def test_auto_is_fp32_on_cpu_with_no_autocast_and_no_scaler():
    p = resolve_precision("auto", CPU)
    assert p.name == "fp32" and not p.grad_scaler().is_enabled()
    a = torch.randn(4, 4)
    with p.autocast():
        assert (a @ a).dtype == torch.float32


def test_forced_bf16_autocasts_matmuls_on_cpu():
    p = resolve_precision("bf16", CPU)
    a = torch.randn(4, 4)
    with p.autocast():
        assert (a @ a).dtype == torch.bfloat16
    assert not p.grad_scaler().is_enabled()  # bf16 has fp32's exponent: no loss scaling


def test_fp16_needs_cuda():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_on_gpu_picks_bf16_or_fp16_with_scaler():
    p = resolve_precision("auto", torch.device("cuda"))
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert p.name == expected and p.grad_scaler().is_enabled() == (expected == "fp16")
