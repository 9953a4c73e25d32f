"""Lesson 4 check: repeat_kv, the causal mask, eager attention and the Attention module against
tinyllama/model/attention.py and tinyllama/model/masks.py."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.model import Attention, KVCache, LlamaConfig, RotaryEmbedding, repeat_kv
from tinyllama.model.attention import eager_attention
from tinyllama.model.masks import build_attention_mask

REPEAT_HINT = (
    "wrong group order: query head h must read key/value head h // n_rep (each kv head "
    "serves n_rep consecutive query heads: kv0, kv0, kv1, kv1), but yours reads h % KV "
    "(kv0, kv1, kv0, kv1), which is what x.repeat(1, n_rep, 1, 1) gives. Insert the new "
    "axis after the KV axis: x[:, :, None].expand(B, KV, n_rep, S, D).reshape(B, KV * n_rep, S, D)"
)


def _case_repeat_kv(learner: ModuleType, shape, n_rep: int, seed: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    got = learner_attr(learner, "repeat_kv")(x, n_rep)
    mistakes = {REPEAT_HINT: x.repeat(1, n_rep, 1, 1)} if n_rep > 1 and shape[1] > 1 else {}
    compare(
        got,
        repeat_kv(x, n_rep),
        what=f"repeat_kv(x {tuple(shape)}, n_rep={n_rep})",
        dims=("B", "H", "S", "D"),
        atol=0,
        rtol=0,
        mistakes=mistakes,
    )


def _reference_mask(q_len: int, k_len: int, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean (1 or B, 1, T, S), True = may attend."""
    return build_attention_mask(padding, q_len, k_len - q_len, torch.device("cpu"))


def _case_mask(learner: ModuleType, q_len: int, k_len: int) -> None:
    got = learner_attr(learner, "causal_mask")(q_len, k_len)
    expected = _reference_mask(q_len, k_len)[0, 0]
    what = f"causal_mask({q_len}, {k_len})"
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        compare(got, expected, what=what, dims=("T", "S"))
    if got.dtype != torch.bool:
        raise Mismatch(f"{what} has dtype {got.dtype}: return a boolean mask, True = may attend")
    past = k_len - q_len
    mistakes = {
        "the diagonal is blocked: a query must see its own position (keys 0 .. position, included)": expected
        & (torch.arange(k_len)[None, :] != torch.arange(past, k_len)[:, None]),
        "the mask is inverted: True means 'may attend', so the past (keys up to the query's "
        "position) is True and the future False": ~expected,
        f"the cached positions are ignored: with {past} cached keys, query t sits at position "
        f"{past} + t and sees keys 0 .. {past} + t": torch.ones(q_len, k_len, dtype=torch.bool).tril(),
    }
    for hint, wrong in mistakes.items():
        if torch.equal(got, wrong) and not torch.equal(got, expected):
            raise Mismatch(f"{what}: {hint}")
    if not torch.equal(got, expected):
        t, s = (got != expected).nonzero()[0].tolist()
        raise Mismatch(
            f"{what}: query {t} {'may' if expected[t, s] else 'must not'} see key {s} "
            f"(query t sits at position {past} + t and sees keys 0 .. {past} + t)"
        )


def _overflowing_softmax(scores: torch.Tensor) -> torch.Tensor:
    """exp / sum without subtracting the row max: overflows where scores exceed log(finfo.max)."""
    e = scores.exp()
    return e / e.sum(-1, keepdim=True)


def _softmax_of(scores: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.softmax(scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min), -1).to(dtype)


def _case_eager(
    learner: ModuleType,
    heads: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    seed: int,
    scale: float = 1.0,
    masked: bool = False,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, heads, q_len, 8, generator=gen) * scale).to(dtype)
    k = (torch.randn(2, heads, k_len, 8, generator=gen) * scale).to(dtype)
    v = torch.randn(2, heads, k_len, 8, generator=gen).to(dtype)
    padding = None
    if masked:  # the first key of row 1 is padding
        padding = torch.ones(2, k_len, dtype=torch.long)
        padding[1, 0] = 0
    mask = _reference_mask(q_len, k_len, padding) if masked else None
    scaling = 8**-0.5
    exp_out, exp_w = eager_attention(q, k, v, mask, scaling)
    got = learner_attr(learner, "eager_attention")(q, k, v, mask, scaling)
    if not isinstance(got, tuple) or len(got) != 2:
        raise Mismatch("eager_attention must return a tuple (output, weights)")
    allowed = _reference_mask(q_len, k_len, padding)
    raw = q @ k.transpose(-1, -2)
    blocked = torch.finfo(dtype).min
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    mistakes = {
        "exp(scores) / sum overflows for large scores: use F.softmax (it subtracts the row "
        "maximum first), in float32": _overflowing_softmax((raw * scaling).masked_fill(~allowed, blocked)),
        "the causal mask is missing: future keys got weight (build it with causal_mask when "
        "attention_mask is None)": _softmax_of(raw * scaling, torch.ones_like(allowed), dtype),
        "the mask is applied the wrong way round: True means 'may attend', fill the scores "
        "where the mask is False": _softmax_of(raw * scaling, ~allowed, dtype),
        "scores are not scaled: multiply Q K^T by scaling (1 / sqrt(D)) before the softmax": _softmax_of(
            raw, allowed, dtype
        ),
    }
    label = f"({dtype}, T={q_len}, S={k_len}{', padding mask' if masked else ''})"
    compare(
        got[1], exp_w, what=f"attention weights {label}", dims=("B", "H", "T", "S"), mistakes=mistakes, **tol
    )
    compare(got[0], exp_out, what=f"attention output {label}", dims=("B", "H", "T", "D"), **tol)


def _config(heads: int, kv_heads: int, bias: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32,
        hidden_size=heads * 8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attention_bias=bias,
        max_position_embeddings=64,
        attn_implementation="eager",
    )


def _case_module(
    learner: ModuleType, heads: int, kv_heads: int, seed: int, bias: bool = False, cached: bool = False
) -> None:
    config = _config(heads, kv_heads, bias)
    torch.manual_seed(seed)
    ref = Attention(config, 0)
    mine = learner_attr(learner, "Attention")(config, 0)
    try:
        mine.load_state_dict(ref.state_dict())
    except RuntimeError as e:
        raise Mismatch(
            "cannot load the reference weights into your Attention: use q_proj (C -> H*D), "
            "k_proj and v_proj (C -> KV*D), o_proj (H*D -> C), bias=config.attention_bias "
            f"({str(e).splitlines()[-1].strip()})"
        ) from e
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, config.hidden_size, generator=gen)
    rotary = RotaryEmbedding(config)
    label = f"H={heads} KV={kv_heads}"
    with torch.no_grad():
        if not cached:
            pos = rotary(x, torch.arange(6)[None])
            compare(mine(x, pos), ref(x, pos), what=f"Attention output ({label})", dims=("B", "T", "C"))
            return
        # Prefill 5 tokens, then decode the 6th with the cache: must equal the full pass.
        caches = [KVCache(config, 2, 8), KVCache(config, 2, 8)]
        outs = []
        for module, cache in zip((mine, ref), caches):
            module(x[:, :5], rotary(x, torch.arange(5)[None]), None, cache)
            outs.append(module(x[:, 5:], rotary(x, torch.arange(5, 6)[None]), None, cache))
        compare(
            outs[0],
            outs[1],
            what=f"Attention output for a decode step with a KV cache ({label}): "
            "call past_key_values.update(k, v, self.layer_idx) after RoPE and attend over what "
            "it returns",
            dims=("B", "T", "C"),
        )


def check(grader: Grader, learner: ModuleType) -> None:
    for seed, (shape, n_rep) in enumerate([((2, 2, 5, 4), 3), ((1, 4, 3, 8), 2), ((2, 3, 4, 4), 1)]):
        grader.case(
            f"repeat_kv {shape} n_rep={n_rep}",
            lambda s=shape, n=n_rep, seed=seed: _case_repeat_kv(learner, s, n, seed),
        )
    grader.case("causal_mask T=S=5", lambda: _case_mask(learner, 5, 5))
    grader.case("causal_mask T=3 after 4 cached keys", lambda: _case_mask(learner, 3, 7))
    grader.case("causal_mask T=1 after 5 cached keys", lambda: _case_mask(learner, 1, 6))
    grader.case("eager_attention float32", lambda: _case_eager(learner, 2, 5, 5, torch.float32, 0))
    grader.case(
        "eager_attention with a padding mask",
        lambda: _case_eager(learner, 2, 4, 6, torch.float32, 1, masked=True),
    )
    grader.case(
        "eager_attention float16 with large scores",
        lambda: _case_eager(learner, 2, 5, 5, torch.float16, 2, scale=6.0),
    )
    for seed, (heads, kv) in enumerate([(4, 4), (4, 2), (4, 1)]):
        grader.case(
            f"Attention H={heads} KV={kv}", lambda h=heads, k=kv, s=seed: _case_module(learner, h, k, s)
        )
    grader.case("Attention with bias", lambda: _case_module(learner, 2, 1, 3, bias=True))
    grader.case("Attention decode step with a KV cache", lambda: _case_module(learner, 4, 2, 4, cached=True))
