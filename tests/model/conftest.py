"""Model-test helpers: tiny configs and the same model in transformers, weights copied strictly.

transformers is a dev dependency: a test that asks for `hf_twin` is skipped without it, the
others (most of this folder) run anyway."""

from __future__ import annotations

import pytest
import torch

from tinyllama.model import LlamaConfig

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
    initializer_range=0.2,
)  # a large init spreads the logits, so mismatches show


def make_tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def hf_config(cfg: LlamaConfig):
    """The transformers config with the same shape and behaviour."""
    import transformers

    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.resolved_num_key_value_heads,
        head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        hidden_act=cfg.hidden_act,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        num_labels=cfg.num_labels,
        problem_type=cfg.problem_type,
        attention_dropout=cfg.attention_dropout,
    )
    if cfg.model_type == "qwen2":
        return transformers.Qwen2Config(
            **common,
            use_sliding_window=cfg.sliding_window is not None,
            sliding_window=cfg.sliding_window,
            max_window_layers=cfg.max_window_layers,
        )
    return transformers.LlamaConfig(**common, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def make_hf_twin(model, head: str = "CausalLM"):
    """transformers' model of the same class (e.g. Qwen2ForCausalLM), with `model`'s weights
    loaded by load_state_dict(strict=True): every key and shape must match exactly."""
    import transformers

    cfg = model.config
    family = "Qwen2" if cfg.model_type == "qwen2" else "Llama"
    cls = getattr(transformers, f"{family}For{head}")
    hf = cls._from_config(hf_config(cfg), attn_implementation=cfg.attn_implementation)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def relative_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative error of the whole tensor (norm of the difference over norm of the reference)."""
    err = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Helpers as fixtures (tests run in importlib mode, where conftest is not importable).
@pytest.fixture
def tiny_config():
    """tiny_config(**overrides) -> a small LlamaConfig (2 layers, 4 heads, 2 KV heads, C=32)."""
    return make_tiny_config


@pytest.fixture
def hf_twin():
    """hf_twin(model, head="CausalLM") -> transformers' model with the same weights, eval mode;
    the test is skipped where transformers is not installed."""
    pytest.importorskip("transformers")
    return make_hf_twin


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, rtol=1e-5): relative error of the whole tensor."""
    return relative_close
