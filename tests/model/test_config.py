"""LlamaConfig validation and the model presets in configs/model/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tinyllama.cli import to_job
from tinyllama.model import MLP, LlamaConfig, LlamaForCausalLM
from tinyllama.model.mlp import ACTIVATIONS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hidden_size=100), "hidden_size=100: must be divisible by num_attention_heads=6"),
        (dict(num_key_value_heads=4), "num_key_value_heads=4: num_attention_heads=6 must be a multiple"),
        (dict(num_key_value_heads=0), "num_key_value_heads=0: must be > 0"),
        (dict(head_dim=0), "head_dim=0: must be > 0"),
        (dict(hidden_size=30, num_attention_heads=6, num_key_value_heads=6), "head_dim=5: must be even"),
        (dict(vocab_size=0), "vocab_size=0: must be > 0"),
        (dict(num_hidden_layers=0), "num_hidden_layers=0: must be > 0"),
        (dict(intermediate_size=-1), "intermediate_size=-1: must be > 0"),
        (dict(max_position_embeddings=0), "max_position_embeddings=0: must be > 0"),
        (dict(num_labels=0), "num_labels=0: must be > 0"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps=0.0: must be > 0"),
        (dict(rope_theta=-1.0), "rope_theta=-1.0: must be > 0"),
        (dict(initializer_range=-0.1), "initializer_range=-0.1: must be >= 0"),
        (dict(attention_dropout=1.0), "attention_dropout=1.0: must be in [0, 1)"),
        (dict(hidden_act="swish"), "hidden_act='swish': choose one of"),
        (dict(attn_implementation="flash"), "attn_implementation='flash': choose sdpa or eager"),
        (dict(model_type="mistral"), "model_type='mistral': choose llama or qwen2"),
        (dict(model_type="qwen2", attention_bias=True), "attention_bias=True: Qwen2 always has q/k/v bias"),
        (dict(problem_type="ranking"), "problem_type='ranking': choose null or one of"),
        (dict(pad_token_id=4096), "pad_token_id=4096: must be null or in [0, vocab_size=4096)"),
        (dict(model_type="qwen2", sliding_window=0), "sliding_window=0: must be > 0"),
        (dict(sliding_window=64), "sliding_window=64: a Qwen2 feature"),
        (dict(max_window_layers=-1), "max_window_layers=-1: must be >= 0"),
        (
            dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
            "rope_scaling.rope_type='yarn': choose one of",
        ),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), 'rename the key "type" to "rope_type"'),
        (dict(rope_scaling={"rope_type": "linear"}), "rope_type linear needs the key 'factor'"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 0.5}), "rope_scaling.factor=0.5: must be >= 1"),
        (
            dict(rope_scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
            "rope_type llama3 needs the key 'low_freq_factor'",
        ),
        (
            dict(rope_scaling={**LLAMA3, "high_freq_factor": 1.0}),
            "high_freq_factor=1.0: must be greater than",
        ),
    ],
    ids=lambda v: "" if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v)[:60],
)
def test_each_invalid_config_raises_a_value_error_naming_field_and_value(overrides, message):
    with pytest.raises(ValueError) as excinfo:
        LlamaConfig(**overrides)
    assert message in str(excinfo.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as excinfo:
        LlamaConfig(vocab_size=0, hidden_act="tanh", rope_theta=0.0)
    text = str(excinfo.value)
    assert "vocab_size=0" in text and "hidden_act='tanh'" in text and "rope_theta=0.0" in text


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_accepted_activation_builds_and_runs(act):
    mlp = MLP(LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, hidden_act=act))
    x = torch.randn(2, 3, 8)
    assert mlp(x).shape == (2, 3, 8) and not torch.equal(mlp.act_fn(x), x)


def test_valid_edge_cases():
    LlamaConfig(num_key_value_heads=None)  # MHA
    LlamaConfig(hidden_size=100, head_dim=16)  # explicit head_dim frees hidden_size from heads
    LlamaConfig(rope_scaling=LLAMA3)
    cfg = LlamaConfig(model_type="qwen2", sliding_window=8, max_window_layers=2, num_hidden_layers=4)
    assert [cfg.uses_sliding_window(i) for i in range(4)] == [False, False, True, True]


def stated_size(header: str):
    """The parameter count a preset's header comment states ("6,738,415,616 parameters",
    "1.25M parameters", "a ~11M-parameter model"), with the way to print a count like it; or None."""
    exact = re.search(r"(\d{1,3}(?:,\d{3})+) parameters", header)
    if exact:
        return exact.group(1), lambda n: f"{n:,}"
    approx = re.search(r"(\d+(?:\.\d+)?)M[- ]parameter", header)
    if approx:
        decimals = len(approx.group(1).partition(".")[2])
        return approx.group(1), lambda n: f"{n / 1e6:.{decimals}f}"
    return None


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_validate_and_build(preset):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        job = to_job(compose("train", overrides=[f"model={preset}"]))
    path = CONFIG_DIR / "model" / f"{preset}.yaml"
    yaml = OmegaConf.to_container(OmegaConf.load(path))
    assert {key: getattr(job.model, key) for key in yaml} == yaml  # every key of the preset took effect
    with torch.device("meta"):  # shapes only: no memory even for the 8B preset
        model = LlamaForCausalLM(job.model)
    assert model.lm_head.weight.shape == (job.model.vocab_size, job.model.hidden_size)
    stated = stated_size("\n".join(line for line in path.read_text().splitlines() if line.startswith("#")))
    if stated is not None:  # the comment cannot drift from the shape it describes
        text, formatted = stated
        assert formatted(model.num_parameters()) == text, f"{path.name} states {text} parameters"


def test_tiny_preset_is_the_default_and_runs_a_step():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_job(compose("train")).model
    assert cfg.vocab_size == 4096 and cfg.hidden_size == 128 and cfg.num_hidden_layers == 4
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(4096.0)).item()) < 0.5  # ~uniform at init
