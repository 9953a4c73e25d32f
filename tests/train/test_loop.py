"""The training loop end to end on the tiny model and tiny_data (seconds per run)."""

from __future__ import annotations

import copy
import json
import math
import signal

import pytest
import torch

from tinyllama.checkpoint import build_model, load_checkpoint
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.losses import evaluate_loss
from tinyllama.model import heads
from tinyllama.train import loop
from tinyllama.train.loop import Trainer, run_training
from tinyllama.train.nan_guard import NonFiniteLossError


def metrics(job):
    lines = (loop.run_dir_of(job) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(job):
    return {m["step"]: m["loss"] for m in metrics(job) if "loss" in m}


def val_losses(job):
    return {m["step"]: m["val_loss"] for m in metrics(job) if "val_loss" in m}


def stop_after(monkeypatch, step, sig=signal.SIGTERM):
    """Deliver `sig` to this process during optimizer step `step` (as a preemption would)."""
    real = Trainer.optimizer_step

    def optimizer_step(self, loss, grad_norm):
        real(self, loss, grad_norm)
        if self.step + 1 == step:
            signal.raise_signal(sig)

    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)


def test_tiny_run_learns_and_fills_the_run_folder(tiny_job):
    final = run_training(tiny_job)
    run = loop.run_dir_of(tiny_job)
    vals = val_losses(tiny_job)
    assert sorted(vals) == [0, 10, 20] and vals[20] == final
    assert final < vals[0] - 1.0  # from ~ln(512) = 6.2 to well below
    lines = [m for m in metrics(tiny_job) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, 21))
    assert all({"step", "loss", "lr", "tokens", "tok_per_s"} <= set(m) for m in lines)
    assert lines[-1]["tokens"] == 20 * 8 * 32
    assert (run / "config.yaml").is_file() and (run / "samples.txt").read_text().strip()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_loss"] == final and summary["tokens_seen"] == 20 * 8 * 32
    # The checkpoint reproduces the final validation loss through the one loader.
    ckpt = load_checkpoint(run)
    assert ckpt.step == 20 and ckpt.val_loss == final
    from tinyllama.data import eval_batches

    packed = loop.prepare_data(tiny_job, loop.setup_distributed("cpu"))[1]
    again = evaluate_loss(build_model(ckpt), eval_batches(packed, "val", 8, 32, max_batches=4), "cpu")
    assert again["loss"] == pytest.approx(final, abs=1e-6)


def test_resume_gives_bit_identical_losses(tiny_job, tmp_path, monkeypatch):
    straight = copy.deepcopy(tiny_job)
    straight.run.dir = str(tmp_path / "straight")
    run_training(straight)

    with monkeypatch.context() as m:
        stop_after(m, 10)
        run_training(tiny_job)  # SIGTERM in step 10: finishes it, saves, returns
    assert load_checkpoint(loop.run_dir_of(tiny_job)).step == 10
    assert max(train_losses(tiny_job)) == 10
    run_training(tiny_job)  # checkpoint.resume=auto
    assert train_losses(tiny_job) == train_losses(straight)  # exact float equality, all 20 steps
    assert val_losses(tiny_job)[20] == val_losses(straight)[20]


def test_grad_checkpointing_gives_the_same_losses(tiny_job, tmp_path, monkeypatch):
    tiny_job.train.max_steps = 4
    plain, ckpt = copy.deepcopy(tiny_job), copy.deepcopy(tiny_job)
    ckpt.train.grad_checkpointing, ckpt.run.dir = True, str(tmp_path / "gc")
    import tinyllama.model.modeling as modeling

    calls = []
    real = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_training(plain)
    assert not calls
    run_training(ckpt)
    assert calls  # the flag reached the model: layers were recomputed, not just stored
    a, b = train_losses(plain), train_losses(ckpt)
    assert a.keys() == b.keys()
    torch.testing.assert_close(list(a.values()), list(b.values()), rtol=1e-6, atol=1e-6)


def test_auto_on_a_bf16_cpu_trains_evaluates_and_samples_in_bf16(tiny_job, capsys, monkeypatch):
    from tinyllama.train import precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: (True, "faked native bf16"))
    tiny_job.train.precision, tiny_job.train.max_steps = "auto", 4
    tiny_job.eval.every, tiny_job.eval.batches, tiny_job.sample.max_new_tokens = 4, 2, 4
    final = run_training(tiny_job)
    out = capsys.readouterr().out
    assert out.lstrip().startswith("parallel: single process | precision: bf16 (auto: faked native bf16)")
    run = loop.run_dir_of(tiny_job)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["precision_reason"] == "auto: faked native bf16"
    assert "# precision: bf16" in (run / "config.yaml").read_text()
    assert json.loads((run / "launches.jsonl").read_text())["precision"] == "bf16"
    ckpt = load_checkpoint(run)
    assert all(t.dtype == torch.float32 for t in ckpt.model_state.values())  # master weights
    assert (run / "samples.txt").read_text().strip()  # sampling (fp32 fast path) after bf16
    # The in-run evaluation ran under bf16 autocast; the evaluate stage's fp32 loss of the saved
    # weights agrees to bf16's rounding (8 mantissa bits: ~0.4% per product, far below 5%).
    from tinyllama.data import eval_batches

    packed = loop.prepare_data(tiny_job, loop.setup_distributed("cpu"))[1]
    fp32 = evaluate_loss(build_model(ckpt), eval_batches(packed, "val", 8, 32, max_batches=2), "cpu")
    assert math.isfinite(final) and fp32["loss"] == pytest.approx(final, rel=0.05)


def test_the_last_step_gets_its_training_line(tiny_job):
    tiny_job.train.max_steps, tiny_job.train.log_every = 7, 3
    tiny_job.eval.every = tiny_job.checkpoint.every = 100
    run_training(tiny_job)
    lines = [m for m in metrics(tiny_job) if "loss" in m]
    assert [m["step"] for m in lines] == [3, 6, 7]
    assert lines[-1]["tokens"] == 7 * 8 * 32


def test_a_stopped_run_logs_its_last_steps(tiny_job, monkeypatch):
    tiny_job.train.log_every = 4
    stop_after(monkeypatch, 6)
    run_training(tiny_job)
    assert sorted(train_losses(tiny_job)) == [4, 6]  # step 6's line covers steps 5 and 6


def _nan_at(monkeypatch, steps):
    """Make causal_lm_loss return NaN during the given optimizer steps (1-based): the loop gets
    its loss from model(x, shift_labels=y), which calls heads.causal_lm_loss."""
    real = heads.causal_lm_loss
    calls = {"n": 0}

    def loss(logits, y):
        calls["n"] += 1  # grad_accum = 1: one call per step
        out = real(logits, y)
        return out * float("nan") if calls["n"] in steps else out

    monkeypatch.setattr(heads, "causal_lm_loss", loss)


def test_nan_loss_stops_and_keeps_the_good_checkpoint(tiny_job, monkeypatch):
    _nan_at(monkeypatch, {15})
    with pytest.raises(NonFiniteLossError, match="at step 15"):
        run_training(tiny_job)
    ckpt = load_checkpoint(loop.run_dir_of(tiny_job))
    assert ckpt.step == 10
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())


def test_nan_policy_skip_skips_the_step(tiny_job, monkeypatch):
    tiny_job.train.nan_policy, tiny_job.train.max_steps = "skip", 6
    _nan_at(monkeypatch, {3})
    assert math.isfinite(run_training(tiny_job))
    summary = json.loads((loop.run_dir_of(tiny_job) / "summary.json").read_text())
    assert summary["skipped_steps"] == 1


def test_resume_refuses_another_model_naming_the_field(tiny_job):
    tiny_job.train.max_steps = 2
    run_training(tiny_job)
    run = loop.run_dir_of(tiny_job)
    before = {p.name: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")}
    tiny_job.model.num_hidden_layers = 3
    with pytest.raises(CheckpointError, match="model.num_hidden_layers: checkpoint 2, config 3"):
        run_training(tiny_job)
    tiny_job.checkpoint.resume = "never"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run_training(tiny_job)
    assert before == {p.name: p.read_bytes() for p in (run / "config.yaml", run / "metrics.jsonl")}


def test_init_from_loads_weights_only(tiny_job, tmp_path):
    tiny_job.train.max_steps = 10
    first = run_training(tiny_job)
    second = copy.deepcopy(tiny_job)
    second.run.dir, second.init_from, second.train.max_steps = str(tmp_path / "b"), tiny_job.run.dir, 1
    run_training(second)
    assert val_losses(second)[0] == pytest.approx(first, abs=1e-6)  # starts where the first ended
    assert min(train_losses(second)) == 1  # but a fresh run: step 1, fresh optimizer

    from tinyllama.export import export_hf

    hf = export_hf(load_checkpoint(tiny_job.run.dir), tmp_path / "hf")
    third = copy.deepcopy(second)
    third.run.dir, third.init_from = str(tmp_path / "c"), f"hf:{hf}"
    run_training(third)
    assert val_losses(third)[0] == pytest.approx(first, abs=1e-5)
    third.run.dir, third.model.hidden_size = str(tmp_path / "d"), 32
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint 64, config 32"):
        run_training(third)


def test_wandb_offline_keeps_one_run_id_across_a_resume(tiny_job, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_job.logger.name, tiny_job.logger.mode, tiny_job.train.max_steps = "wandb", "offline", 2
    run_training(tiny_job)
    run = loop.run_dir_of(tiny_job)
    run_id = (run / "wandb_id.txt").read_text().strip()
    tiny_job.train.max_steps = 3
    run_training(tiny_job)
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)


def test_no_samples_asked_writes_none(tiny_job):
    tiny_job.train.max_steps, tiny_job.sample.num_samples = 2, 0
    loop.run_training(tiny_job)
    run = loop.run_dir_of(tiny_job)
    assert (run / "summary.json").is_file() and not (run / "samples.txt").exists()
