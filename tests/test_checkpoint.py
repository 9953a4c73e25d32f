"""Checkpoints: round trip, the one loader, atomicity under a killed save, and clear errors for
corrupt or incomplete folders (the training-side checkpointer: tests/train/test_checkpointer.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tinyllama.checkpoint import build_model, config_differences, load_checkpoint, save_checkpoint
from tinyllama.config import JobConfig
from tinyllama.errors import CheckpointError
from tinyllama.model import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


@pytest.fixture
def run(tmp_path):
    """(run_dir, model, save(step)) with a fake tokenizer file."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"sentencepiece-bytes")
    job = JobConfig(model=CFG)
    root = tmp_path / "run" / "checkpoints"

    def save(step, val_loss=None, state=None):
        return save_checkpoint(
            root,
            step,
            model,
            CFG,
            job,
            tok,
            {"tokens": step * 10, "val_loss": val_loss, "tokenizer_fingerprint": "fp"},
            state if state is not None else {"step": step, "x": torch.arange(3)},
        )

    return tmp_path / "run", model, save


def test_round_trip_through_the_one_loader(run):
    run_dir, model, save = run
    save(5, val_loss=2.5)
    ck = load_checkpoint(run_dir)  # a run folder resolves through checkpoints/latest
    assert ck.path.name == "step_5" and ck.step == 5 and ck.tokens == 50 and ck.val_loss == 2.5
    assert ck.model_config == CFG and ck.job.model == CFG
    assert ck.tokenizer_path.read_bytes() == b"sentencepiece-bytes"
    assert ck.tokenizer_fingerprint == "fp"
    assert torch.equal(ck.train_state["x"], torch.arange(3))
    assert set(ck.model_state) == set(model.state_dict())  # HF names, tied head filled back in
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(build_model(ck)(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    assert not build_model(ck).training


def test_tied_head_is_stored_once_and_keys_have_no_wrapper_prefixes(run):
    run_dir, _, save = run
    from safetensors.torch import load_file

    keys = set(load_file(save(1) / "model.safetensors"))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def test_weights_only_loading_skips_train_state(run):
    run_dir, _, save = run
    save(1)
    (run_dir / "checkpoints" / "step_1" / "train_state.pt").unlink()
    assert load_checkpoint(run_dir, train_state=False).train_state is None
    with pytest.raises(CheckpointError, match="weights only.*init_from"):
        load_checkpoint(run_dir)


@pytest.mark.parametrize(
    "victim, damage",
    [
        ("model.safetensors", "truncate"),
        ("meta.json", "garbage"),
        ("train_state.pt", "truncate"),
        ("config.yaml", "garbage"),
        ("model_config.json", "delete"),
    ],
)
def test_corrupt_or_incomplete_checkpoints_raise_checkpoint_error(run, victim, damage):
    run_dir, _, save = run
    path = save(3) / victim
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_text("{not: [valid")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="step_3"):
        load_checkpoint(run_dir)


def test_missing_checkpoint_names_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the save path may catch it and tidy up."""


@pytest.mark.parametrize(
    "target, call",
    [
        ("torch.save", 1),  # halfway through writing the folder
        ("os.replace", 1),  # before the folder is renamed into place
        ("os.replace", 2),  # after the rename, before the latest pointer moves
    ],
)
def test_latest_names_a_loadable_checkpoint_when_a_save_is_killed(run, monkeypatch, target, call):
    run_dir, _, save = run
    save(1)
    module, name = target.split(".")
    module = {"torch": torch, "os": os}[module]
    real = getattr(module, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)
    with pytest.raises(Killed):
        save(2)
    monkeypatch.undo()
    ck = load_checkpoint(run_dir)
    assert ck.step == 1 and ck.train_state is not None  # the pointer moves only at the very end
    save(3)  # a later save cleans up after the killed one
    assert load_checkpoint(run_dir).step == 3
    assert not list((run_dir / "checkpoints").glob(".tmp*"))


def test_config_differences_name_each_field():
    other = LlamaConfig(**{**CFG.__dict__, "hidden_size": 64, "num_hidden_layers": 3})
    assert config_differences(CFG, other) == [
        "model.hidden_size: checkpoint 32, config 64",
        "model.num_hidden_layers: checkpoint 2, config 3",
    ]


def test_a_checkpoint_from_an_older_schema_loads_with_a_warning(run):
    # A key later removed from the config (or the model config) must not make old runs unloadable.
    run_dir, model, save = run
    folder = save(3)
    with open(folder / "config.yaml", "a") as f:
        f.write("retired_key: 1\n")
    cfg_text = (folder / "config.yaml").read_text().replace("train:\n", "train:\n  old_knob: 7\n", 1)
    (folder / "config.yaml").write_text(cfg_text)
    import json

    mc = json.loads((folder / "model_config.json").read_text())
    (folder / "model_config.json").write_text(json.dumps({**mc, "retired_field": True}))
    with pytest.warns(UserWarning) as record:
        ck = load_checkpoint(run_dir)
    messages = " ".join(str(w.message) for w in record)
    assert all(k in messages for k in ("retired_field", "train.old_knob", "retired_key"))
    assert ck.model_config == CFG and ck.job.model == CFG
