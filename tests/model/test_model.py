"""Behaviour of the model on its own: cache, padding, eager vs sdpa, checkpointing, init, parts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tinyllama.model import (
    KVCache,
    LlamaForCausalLM,
    ModelParts,
    RMSNorm,
    RotaryEmbedding,
    causal_lm_loss,
    repeat_kv,
)


def decode_in_steps(model, ids, chunks, cache=None):
    """Feed ids (B, T) in chunks of the given sizes through the cache; return the logits (B, T, V)."""
    out, logits, start = None, [], 0
    for size in chunks:
        out = model(ids[:, start : start + size], past_key_values=cache, use_cache=True)
        cache, start = out.past_key_values, start + size
        logits.append(out.logits)
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "sliding"])
def test_kv_cache_decoding_equals_full_forward(impl, window, tiny_config, assert_close):
    extra = dict(model_type="qwen2", sliding_window=window, max_window_layers=1) if window else {}
    cfg = tiny_config(attn_implementation=impl, **extra)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))  # 20 > max_position_embeddings=16
    full = model(ids).logits
    # Prefill 5, a chunk of 3 (queries after a non-empty cache), then one token at a time;
    # the model's own cache starts at 5 slots and has to grow.
    steps = decode_in_steps(model, ids, [5, 3] + [1] * 12)
    assert_close(steps, full)
    preallocated = KVCache(cfg, batch_size=2, max_length=20, dtype=torch.float32)
    assert_close(decode_in_steps(model, ids, [8] + [1] * 12, preallocated), full)
    assert preallocated.keys[0].shape[2] == 20  # written in place, never regrown


def test_cache_takes_tensors_and_arrays_in_turn(tiny_config):
    """update (the attention layers) and update_arrays (fast_decode's NumPy step) fill the same
    buffers; a cache that is not float32 on the CPU refuses arrays before writing anything."""
    cfg = tiny_config()  # 2 key/value heads of width 8
    cache = KVCache(cfg, batch_size=1, max_length=2)  # no dtype: allocated at the first write
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cache.update(k, v, layer_idx=0)  # 3 positions: the buffers grow past 2
    keys, values = cache.update_arrays(2 * k[:, :, :1].numpy(), 2 * v[:, :, :1].numpy(), layer_idx=0)
    assert cache.get_seq_length(0) == 4 and keys.shape == values.shape == (1, 2, 4, 8)
    torch.testing.assert_close(cache.keys[0][:, :, :4], torch.cat([k, 2 * k[:, :, :1]], dim=2))
    assert torch.equal(torch.from_numpy(values), cache.values[0][:, :, :4])  # views, not copies
    half = KVCache(cfg, batch_size=1, max_length=4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 CPU buffers"):
        half.update_arrays(k[:, :, :1].numpy(), v[:, :, :1].numpy(), layer_idx=0)
    assert half.get_seq_length(0) == 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_and_right_padded_batch_equals_unpadded_rows(impl, tiny_config, assert_close):
    cfg = tiny_config(pad_token_id=0, attn_implementation=impl)
    model = LlamaForCausalLM(cfg).eval()
    rows = [torch.randint(1, cfg.vocab_size, (n,)) for n in (9, 4, 6)]
    width = 9
    for left in (True, False):
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        # Positions count from each row's first real token (what generate derives from the mask).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=positions).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert_close(logits[i][mask[i].bool()], alone)


def test_left_padded_generation_with_cache(tiny_config, assert_close):
    """Prefill a left-padded batch, then decode one token with the grown mask and next positions."""
    cfg = tiny_config(pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    short, long = torch.randint(1, 97, (3,)), torch.randint(1, 97, (6,))
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = (ids != 0).long()
    out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    nxt = torch.tensor([[7], [8]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    positions = mask.sum(-1, keepdim=True) - 1
    step = model(
        nxt, attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values, use_cache=True
    ).logits[:, -1]
    assert_close(step[0], model(torch.cat([short, nxt[0]])[None]).logits[0, -1])
    assert_close(step[1], model(torch.cat([long, nxt[1]])[None]).logits[0, -1])


def test_eager_equals_sdpa_with_padding_and_gqa(tiny_config, assert_close):
    eager = LlamaForCausalLM(tiny_config(attn_implementation="eager", pad_token_id=0)).eval()
    sdpa = LlamaForCausalLM(tiny_config(attn_implementation="sdpa", pad_token_id=0)).eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        a, b = eager(ids, **kwargs).logits, sdpa(ids, **kwargs).logits
        assert_close(a[mask.bool()], b[mask.bool()])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, assert_close):
    cfg = tiny_config(tie_word_embeddings=False)
    plain, ckpt = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.model.gradient_checkpointing = True
    ids = torch.randint(0, 97, (2, 12))
    plain(ids, labels=ids).loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt(ids, labels=ids, use_cache=True).loss.backward()  # cache silently off: warned once
        ckpt(ids, use_cache=True)
    assert sum("gradient checkpointing" in str(w.message) for w in caught) == 1
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert_close(q.grad, p.grad)


def test_labels_loss_is_shifted_and_ignores_minus_100(tiny_config):
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 8))
    labels = ids.clone()
    labels[0, 5:] = -100
    out = model(ids, labels=labels)
    logits = out.logits
    expected = torch.cat(
        [
            torch.nn.functional.cross_entropy(logits[0, :4], ids[0, 1:5], reduction="sum")[None],
            torch.nn.functional.cross_entropy(logits[1, :7], ids[1, 1:], reduction="sum")[None],
        ]
    )
    torch.testing.assert_close(out.loss, expected.sum() / 11)
    # The aligned form the train loop uses gives the same number.
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(causal_lm_loss(logits, targets), out.loss)
    per_token = causal_lm_loss(logits, targets, reduction="none")  # what evaluation sums
    assert per_token.shape == (2, 8) and (per_token[targets == -100] == 0).all()
    torch.testing.assert_close(per_token.sum(), causal_lm_loss(logits, targets, reduction="sum"))


def test_init_and_hf_state_dict_keys(tiny_config):
    cfg = tiny_config(
        model_type="qwen2",
        tie_word_embeddings=False,
        initializer_range=0.02,
        pad_token_id=3,
        num_hidden_layers=1,
    )
    model = LlamaForCausalLM(cfg)
    sd = model.state_dict()
    assert set(sd) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        *(f"model.layers.0.self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")),
        "model.layers.0.self_attn.o_proj.weight",
        *(f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    assert abs(sd["lm_head.weight"].std().item() - 0.02) < 0.002
    assert sd["model.embed_tokens.weight"][3].abs().sum() == 0  # padding row
    assert (sd["model.layers.0.self_attn.q_proj.bias"] == 0).all()
    assert (sd["model.norm.weight"] == 1).all()


def test_tied_head_shares_the_embedding(tiny_config):
    model = LlamaForCausalLM(tiny_config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - 97 * 32
    model.model.norm.weight.requires_grad_(False)  # a frozen gain (C = 32)
    assert model.num_parameters(only_trainable=True) == model.num_parameters() - 32


def test_rmsnorm_computes_in_float32_and_returns_input_dtype():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (torch.randn(2, 3, 16) * 50).to(torch.bfloat16)
    ours, ref = RMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-5)
    ours.weight.data.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)  # a model cast to bf16
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref(x))
    # Statistics in float32: the same as normalising the float32 input, up to the final bf16 rounding.
    x32 = x.float()
    expected = ours.weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(y.float(), expected, rtol=1.6e-2, atol=1e-2)


def test_repeat_kv_equals_repeat_interleave():
    kv = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(kv, 4), kv.repeat_interleave(4, dim=1))
    assert repeat_kv(kv, 1) is kv


def test_rotary_cache_grows_and_survives_a_dtype_cast(tiny_config):
    rope = RotaryEmbedding(tiny_config())
    x = torch.zeros(1)
    assert rope.cos_cached.shape[0] == 16
    cos, sin = rope(x, torch.arange(40)[None])
    assert cos.shape == (1, 40, 8) and rope.cos_cached.shape[0] >= 40
    torch.testing.assert_close(cos[0, :, 0], torch.cos(torch.arange(40.0)))  # inv_freq[0] = 1
    rope.to(torch.bfloat16)  # e.g. model.to(bf16): the tables are rebuilt in float32
    cos_bf16, _ = rope(x.bfloat16(), torch.arange(40)[None])
    assert rope.cos_cached.dtype == torch.float32 and cos_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(cos_bf16.float(), cos, atol=4e-3, rtol=0)


def test_replacement_parts_are_used(tiny_config, assert_close):
    calls = []

    class MyNorm(RMSNorm):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    cfg = tiny_config()
    reference = LlamaForCausalLM(cfg).eval()
    swapped = LlamaForCausalLM(cfg, parts=ModelParts(norm=MyNorm)).eval()
    swapped.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 97, (1, 5))
    assert_close(swapped(ids).logits, reference(ids).logits)
    assert len(calls) == 2 * cfg.num_hidden_layers + 1


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bf16_autocast_and_bf16_weights_with_padding(impl, tiny_config):
    """Tiny shapes only (bf16 matmuls are slow on CPU): the boolean mask serves every dtype."""
    model = LlamaForCausalLM(tiny_config(attn_implementation=impl, pad_token_id=0)).eval()
    ids = torch.randint(1, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = model(ids, attention_mask=mask, position_ids=positions).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(ids, attention_mask=mask, position_ids=positions, use_cache=True).logits
    cast = model.to(torch.bfloat16)(ids, attention_mask=mask, position_ids=positions).logits
    for logits in (auto, cast):
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        real = mask.bool()
        err = (logits.float()[real] - ref[real]).norm() / ref[real].norm()
        assert err < 0.05


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_equals_full_logits_loss(tied, tiny_config, assert_close):
    """chunked_loss on (here with gradient checkpointing, as train/build.py pairs them): the loss
    is computed 5 positions at a time (a ragged last chunk, one chunk all -100) without logits,
    with the full-logits loss's value and gradients. Off, or without targets, logits come back."""
    cfg = tiny_config(tie_word_embeddings=tied)
    plain, chunked = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    chunked.load_state_dict(plain.state_dict())
    assert not plain.chunked_loss  # off unless the builder of the model turns it on
    chunked.chunked_loss, chunked.loss_chunk_tokens = True, 5
    chunked.model.gradient_checkpointing = True
    ids, y = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))  # 24 positions: 5+5+5+5+4
    y[0, 5:10] = -100  # the whole second chunk
    y[1, 3] = -100
    ref, out = plain(ids, shift_labels=y), chunked(ids, shift_labels=y)
    assert out.logits is None
    torch.testing.assert_close(ref.loss, causal_lm_loss(ref.logits, y))
    torch.testing.assert_close(out.loss, ref.loss)
    ref.loss.backward()
    out.loss.backward()
    for p, q in zip(plain.parameters(), chunked.parameters()):
        assert_close(q.grad, p.grad)
    # labels= keeps its shift in the chunked mode; the switch alone decides, not train/eval mode.
    torch.testing.assert_close(chunked(ids, labels=ids).loss, plain(ids, labels=ids).loss)
    chunked.eval()
    assert chunked(ids, shift_labels=y).logits is None
    assert_close(chunked(ids).logits, plain(ids).logits)  # no targets: nothing to chunk
    chunked.chunked_loss = False
    off = chunked(ids, shift_labels=y)
    assert_close(off.logits, plain(ids).logits)
    torch.testing.assert_close(off.loss, ref.loss)
    with pytest.raises(ValueError, match="not both"):
        chunked(ids, labels=ids, shift_labels=y)


def test_logits_to_keep_returns_the_last_positions(tiny_config):
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids, labels=ids)
    torch.testing.assert_close(model(ids, logits_to_keep=0).logits, full.logits)  # 0: every position
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 97)
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    for k in (1, 3, 9):
        out = model(ids, labels=ids, logits_to_keep=k)
        torch.testing.assert_close(out.logits, full.logits[:, -k:])
        # The loss covers the kept positions (k=1: only the last, which has no target: nan).
        torch.testing.assert_close(
            out.loss, causal_lm_loss(full.logits[:, -k:], targets[:, -k:]), equal_nan=True
        )
    with pytest.raises(ValueError, match="logits_to_keep=-1"):
        model(ids, logits_to_keep=-1)
