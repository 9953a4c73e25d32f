"""scripts/gpu_check.py on a machine without a GPU: the CUDA-only checks say why they are
skipped, the checks that can run on a CPU pass, and a failing check fails the run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines_of(capsys) -> dict:
    """{check name: (status, detail)} from the script's output."""
    out = {}
    for line in capsys.readouterr().out.splitlines():
        status, _, rest = line.partition("  ")
        if status in ("PASS", "FAIL", "SKIP"):
            name, _, detail = rest.strip().partition(" ")
            out[name] = (status, detail.strip())
    return out


def test_on_cpu_the_cuda_checks_skip_with_a_reason_and_the_rest_pass(gpu_check, capsys, tmp_path):
    checks = "cuda,train_fp16,sdpa,throughput,fused_adamw,grad_checkpointing"
    code = gpu_check.main(["--device", "cpu", "--only", checks, "--steps", "3", "--workdir", str(tmp_path)])
    lines = lines_of(capsys)
    assert code == 0 and list(lines) == checks.split(",")
    for name in ("cuda", "train_fp16", "sdpa", "throughput"):
        assert lines[name][0] == "SKIP" and "needs a CUDA device" in lines[name][1]
    assert lines["fused_adamw"][0] == "PASS" and "fused=True" in lines["fused_adamw"][1]
    assert lines["grad_checkpointing"][0] == "PASS"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_cuda_the_cuda_check_fails_and_the_others_wait_for_it(gpu_check, capsys, tmp_path):
    code = gpu_check.main(["--only", "cuda,train_bf16", "--workdir", str(tmp_path)])
    lines = lines_of(capsys)
    assert code == 1
    assert lines["cuda"][0] == "FAIL" and "sees no GPU" in lines["cuda"][1]
    assert lines["train_bf16"][0] == "SKIP"
    assert "no CUDA device is visible" in lines["train_bf16"][1]


def test_a_failing_check_is_reported_and_the_next_still_runs(gpu_check, capsys, monkeypatch, tmp_path):
    def broken(ctx):
        raise AssertionError("losses differ by 1e-1")

    monkeypatch.setitem(gpu_check.CHECKS, "fused_adamw", broken)
    code = gpu_check.main(["--device", "cpu", "--only", "fused_adamw,cuda", "--workdir", str(tmp_path)])
    lines = lines_of(capsys)
    assert code == 1 and lines["fused_adamw"][0] == "FAIL"
    assert "losses differ" in lines["fused_adamw"][1] and lines["cuda"][0] == "SKIP"


def test_unknown_check_names_are_refused(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "cuda,warp_drive"])


def test_the_sharded_checks_run_on_two_gloo_processes(gpu_check, capsys, tmp_path):
    code = gpu_check.main(
        ["--device", "cpu", "--only", "fsdp,tp", "--steps", "3", "--workdir", str(tmp_path)]
    )
    lines = lines_of(capsys)
    assert code == 0 and [lines[n][0] for n in ("fsdp", "tp")] == ["PASS", "PASS"]
    assert "the sharded checkpoint consolidates" in lines["fsdp"][1]
