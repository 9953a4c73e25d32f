"""Precision resolution, autocast and the GradScaler switch. `auto` on CPU follows what the CPU
can do; both branches are tested on any machine by faking the capability and the probe."""

from __future__ import annotations

import pytest
import torch

from tinyllama.errors import ConfigError
from tinyllama.train import precision
from tinyllama.train.precision import resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_features(monkeypatch):
    """fake(instructions, speedup): make this CPU report `instructions` (e.g. ("amx",)) and a
    bf16/fp32 matmul ratio of `speedup`; returns the list of probe calls."""
    probes = []

    def fake(instructions, speedup=4.0):
        precision.cpu_native_bf16.cache_clear()
        monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: tuple(instructions))
        monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: probes.append(1) or speedup)
        return probes

    yield fake
    precision.cpu_native_bf16.cache_clear()  # the next test sees the real CPU again


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_skips_the_probe(cpu_features):
    probes = cpu_features(())
    p = resolve_precision("auto", CPU)
    assert p.name == "fp32" and not p.grad_scaler().is_enabled()
    assert "no native bf16" in p.reason and not probes  # no slow emulated product was timed
    a = torch.randn(4, 4)
    with p.autocast():
        assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize("instructions", [("avx512_bf16",), ("amx",), ("avx512_bf16", "amx")])
def test_auto_is_bf16_on_a_cpu_that_multiplies_bf16_natively(cpu_features, instructions):
    cpu_features(instructions, speedup=4.4)
    p = resolve_precision("auto", CPU)
    assert p.name == "bf16" and not p.grad_scaler().is_enabled()
    assert "natively" in p.reason and instructions[0] in p.reason and "4.4x" in p.reason
    a = torch.randn(4, 4)
    with p.autocast():
        assert (a @ a).dtype == torch.bfloat16


def test_auto_keeps_fp32_when_the_flags_are_there_but_the_probe_is_slow(cpu_features):
    probes = cpu_features(("avx512_bf16",), speedup=0.9)
    p = resolve_precision("auto", CPU)
    assert p.name == "fp32" and "0.90x" in p.reason and probes


def test_the_probe_runs_once_per_process(cpu_features):
    probes = cpu_features(("amx",))
    for _ in range(3):
        resolve_precision("auto", CPU)
    assert len(probes) == 1


def test_the_real_probe_measures_a_positive_ratio():
    assert precision.bf16_matmul_speedup(n=64, repeats=2) > 0


def test_forced_bf16_autocasts_matmuls_on_cpu_and_says_when_it_is_emulated(cpu_features):
    cpu_features(())
    p = resolve_precision("bf16", CPU)
    assert "emulates" in p.reason
    a = torch.randn(4, 4)
    with p.autocast():
        assert (a @ a).dtype == torch.bfloat16
    assert not p.grad_scaler().is_enabled()  # bf16 has fp32's exponent: no loss scaling
    cpu_features(("amx",))
    assert resolve_precision("bf16", CPU).reason == "train.precision=bf16"


def test_fp16_needs_cuda_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="choose auto, fp32, bf16, fp16"):
        resolve_precision("half", CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_on_gpu_picks_bf16_or_fp16_with_scaler():
    p = resolve_precision("auto", torch.device("cuda"))
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert p.name == expected and p.grad_scaler().is_enabled() == (expected == "fp16")


def test_cpu_mfu_peak_follows_the_precision(monkeypatch):
    from tinyllama.train import throughput

    seen = []
    monkeypatch.setattr(throughput, "measured_cpu_flops", lambda **k: seen.append(k["dtype"]) or 1.0)
    throughput.peak_flops(CPU, torch.bfloat16)
    throughput.peak_flops(CPU, torch.float32)
    assert seen == [torch.bfloat16, torch.float32]
