"""Parity with transformers' Llama and Qwen2 (the reference), float32: logits and losses to a
relative error < 1e-5, and every parameter's gradient. Weights are copied with
load_state_dict(strict=True), so state-dict keys match exactly too."""

from __future__ import annotations

import pytest
import torch

from tinyllama.model import LlamaForCausalLM, LlamaForSequenceClassification

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.fixture
def check_causal_lm(hf_twin, assert_close):
    """check(cfg, seq_len, batch): logits and the labels loss match transformers."""

    def check(cfg, seq_len: int = 12, batch: int = 2) -> None:
        model = LlamaForCausalLM(cfg).eval()
        hf = hf_twin(model)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
        ours, ref = model(ids, labels=ids), hf(ids, labels=ids)
        assert_close(ours.logits, ref.logits)
        assert_close(ours.loss, ref.loss)
        assert_close(model(ids, logits_to_keep=3).logits, hf(ids, logits_to_keep=3).logits)

    return check


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradients_match_transformers(family, tied, tiny_config, hf_twin):
    """Backward of the labels loss through both models: the same parameters (by name), and each
    one's gradient equal to transformers' within float32 rounding.

    Tolerances from float32 arithmetic: each operation rounds to ~6e-8 relative, and a gradient
    element sums products over B*T = 24 positions through 2 layers in another order than
    transformers does (other kernels, repeat_kv, fused ops), so elements differ by a few float32
    ulps of the largest terms: ~1e-7 absolute here, where each tensor's largest gradient is
    0.02-0.6. atol 1e-6 bounds that absolute drift (ten times the observed) for elements near 0,
    where a relative bound means nothing; rtol 1e-4 bounds the rest. A real mistake (a missed
    bias, a swapped head, a mis-shifted label) moves gradients by orders of magnitude more."""
    extra = dict(model_type="qwen2") if family == "qwen2" else dict(attention_bias=True, mlp_bias=True)
    cfg = tiny_config(tie_word_embeddings=tied, **extra)
    model = LlamaForCausalLM(cfg).train()  # attention_dropout 0: the same math as eval
    hf = hf_twin(model).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()
    hf(ids, labels=ids).loss.backward()
    ours, theirs = dict(model.named_parameters()), dict(hf.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(
            p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_heads_and_tying(kv_heads, tied, tiny_config, check_causal_lm):
    check_causal_lm(tiny_config(num_key_value_heads=kv_heads, tie_word_embeddings=tied))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_attention_and_mlp_bias_explicit_head_dim(impl, tiny_config, check_causal_lm):
    check_causal_lm(tiny_config(attention_bias=True, mlp_bias=True, head_dim=16, attn_implementation=impl))


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        LLAMA3,
    ],
    ids=["default", "linear", "dynamic", "llama3"],
)
def test_rope_scaling_beyond_max_position_embeddings(scaling, tiny_config, check_causal_lm):
    # theta 10 with head_dim 16 gives wavelengths of 6.3 to 47 tokens, so llama3 (original
    # context 32) keeps one band, smooths the middle ones and divides the longest by its factor.
    cfg = tiny_config(hidden_size=64, rope_theta=10.0, rope_scaling=scaling, max_position_embeddings=48)
    check_causal_lm(cfg, seq_len=64)  # 64 > 48: the cos/sin cache grows, dynamic NTK kicks in


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_qwen2_qkv_bias(impl, tiny_config, check_causal_lm):
    cfg = tiny_config(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, attn_implementation=impl)
    model = LlamaForCausalLM(cfg)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None
    check_causal_lm(cfg)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_qwen2_sliding_window(impl, tiny_config, assert_close, check_causal_lm):
    # Layer 0 is full attention, layer 1 (>= max_window_layers) sees only the last 4 tokens.
    cfg = tiny_config(
        model_type="qwen2",
        sliding_window=4,
        max_window_layers=1,
        num_hidden_layers=2,
        attn_implementation=impl,
    )
    check_causal_lm(cfg, seq_len=14)
    full = LlamaForCausalLM(tiny_config(model_type="qwen2", attn_implementation=impl)).eval()
    windowed = LlamaForCausalLM(cfg).eval()
    windowed.load_state_dict(full.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 14))
    # The window changes nothing for the first 4 positions, and does change later ones.
    a, b = full(ids).logits, windowed(ids).logits
    assert_close(b[:, :4], a[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def padded_batch(rows, pad_id: int, left: bool):
    """rows of token lists -> input_ids, attention_mask (B, T) padded on the left or the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_batch_matches_transformers(impl, tiny_config, hf_twin, assert_close):
    cfg = tiny_config(pad_token_id=0, attn_implementation=impl)
    model = LlamaForCausalLM(cfg).eval()
    hf = hf_twin(model)
    ids, mask = padded_batch([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], pad_id=0, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = model(ids, attention_mask=mask, position_ids=positions).logits
    ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_close(ours[real], ref[real])


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize(
    "problem,num_labels",
    [("regression", 1), ("single_label_classification", 3), ("multi_label_classification", 3)],
)
def test_sequence_classification(left, problem, num_labels, tiny_config, hf_twin, assert_close):
    cfg = tiny_config(pad_token_id=0, num_labels=num_labels, problem_type=problem)
    model = LlamaForSequenceClassification(cfg).eval()
    hf = hf_twin(model, head="SequenceClassification")
    ids, mask = padded_batch([[5, 6, 7, 8, 9], [12, 13], [3, 4, 5, 6]], pad_id=0, left=left)
    labels = {
        "regression": torch.randn(3),
        "single_label_classification": torch.tensor([0, 2, 1]),
        "multi_label_classification": torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]]),
    }[problem]
    kwargs = dict(attention_mask=mask, labels=labels)
    if left:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    ours, ref = model(ids, **kwargs), hf(ids, **kwargs)
    assert ours.logits.shape == (3, num_labels)
    assert_close(ours.logits, ref.logits)
    assert_close(ours.loss, ref.loss)


def test_sequence_classification_infers_problem_type_like_transformers(tiny_config, hf_twin, assert_close):
    cfg = tiny_config(pad_token_id=0, num_labels=3)  # problem_type None: integer labels -> CE
    model = LlamaForSequenceClassification(cfg).eval()
    hf = hf_twin(model, head="SequenceClassification")
    ids, labels = torch.randint(1, 97, (2, 6)), torch.tensor([2, 0])
    assert_close(model(ids, labels=labels).loss, hf(ids, labels=labels).loss)
