"""Lesson 3 check: RoPE against tinyllama/model/rotary.py."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.model import LlamaConfig, RotaryEmbedding, apply_rotary_pos_emb, rotate_half
from tinyllama.model.rotary import compute_inv_freq

HEAD_DIMS = ("B", "H", "T", "D")


def _interleaved_rotate(x: torch.Tensor) -> torch.Tensor:
    """The GPT-J / original-Meta layout: pairs (2i, 2i+1) instead of (i, i + D/2)."""
    pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1)
    return pairs.flatten(-2)


def _rotate_mistakes(x: torch.Tensor) -> dict:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return {
        "returned [x2, -x1]: the minus sign goes on x2, rotate_half(x) = [-x2, x1]": torch.cat(
            (x2, -x1), dim=-1
        ),
        "returned [x2, x1] without the minus sign: rotate_half(x) = [-x2, x1]": torch.cat((x2, x1), dim=-1),
        "returned [-x1, x2]: you rotated the wrong half; the first half of the result is -x2 "
        "(the second half of x), the second half is x1": torch.cat((-x1, x2), dim=-1),
        "rotated interleaved pairs (2i, 2i+1) (the GPT-J layout): this model pairs channel i "
        "with channel i + D/2 (half-split), like Hugging Face's Llama": _interleaved_rotate(x),
    }


def _with_half_hint(fn, head_dim: int) -> None:
    """Turn 'values differ from index D/2 on' into the question the learner should ask."""
    try:
        fn()
    except Mismatch as e:
        if f"from index {head_dim // 2} of D on" in str(e):
            raise Mismatch(
                f"{e}: only the second half is wrong, did you rotate the wrong half? "
                f"rotate_half(x) = [-x2, x1]: the minus sign goes on x2 = x[..., D/2:] in "
                f"the first half, and x1 = x[..., :D/2] comes second, unchanged"
            ) from None
        raise


def _case_rotate_half(learner: ModuleType, shape, seed: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    got = learner_attr(learner, "rotate_half")(x.clone())
    _with_half_hint(
        lambda: compare(
            got,
            rotate_half(x),
            what=f"rotate_half(x) for x {shape}",
            dims=HEAD_DIMS,
            mistakes=_rotate_mistakes(x),
        ),
        shape[-1],
    )


def _tables(head_dim: int, seq_len: int, seed: int, dtype=torch.float32):
    config = _config(head_dim)
    gen = torch.Generator().manual_seed(seed)
    position_ids = torch.randint(0, 4 * seq_len, (2, seq_len), generator=gen)
    return RotaryEmbedding(config)(torch.empty(0, dtype=dtype), position_ids)


def _case_apply(
    learner: ModuleType,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    seq = 6
    q = torch.randn(2, heads, seq, head_dim, generator=gen).to(dtype)
    k = torch.randn(2, kv_heads, seq, head_dim, generator=gen).to(dtype)
    cos, sin = _tables(head_dim, seq, seed, dtype)
    got = learner_attr(learner, "apply_rotary_pos_emb")(q.clone(), k.clone(), cos, sin)
    if not isinstance(got, tuple) or len(got) != 2:
        raise Mismatch("apply_rotary_pos_emb must return a tuple (q_embed, k_embed)")
    exp_q, exp_k = apply_rotary_pos_emb(q, k, cos, sin)
    cos1, sin1 = cos.unsqueeze(1), sin.unsqueeze(1)
    mistakes = {
        "cos and sin are swapped: x * cos + rotate_half(x) * sin": q * sin1 + rotate_half(q) * cos1,
        "the rotated term is subtracted: x * cos + rotate_half(x) * sin (the minus sign "
        "lives inside rotate_half)": q * cos1 - rotate_half(q) * sin1,
    }
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for name, g, e, extra in (("q", got[0], exp_q, mistakes), ("k", got[1], exp_k, {})):
        _with_half_hint(
            lambda g=g, e=e, name=name, extra=extra: compare(
                g,
                e,
                what=f"rotated {name} ({dtype}, {heads} heads, {kv_heads} kv heads, D={head_dim})",
                dims=HEAD_DIMS,
                mistakes=extra,
                **tol,
            ),
            head_dim,
        )


def _config(
    head_dim: int, theta: float = 10000.0, scaling: Optional[dict] = None, max_pos: int = 64
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32,
        hidden_size=2 * head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
    )


def _case_inv_freq(
    learner: ModuleType, head_dim: int, theta: float, scaling: Optional[dict], seq_len: Optional[int]
) -> None:
    config = _config(head_dim, theta, scaling)
    expected = compute_inv_freq(config, seq_len)
    got = learner_attr(learner, "rope_inv_freq")(head_dim, theta, scaling, seq_len, 64)
    mistakes = {}
    if scaling and scaling["rope_type"] == "dynamic" and seq_len and seq_len > 64:
        f = scaling["factor"]
        base = theta * (f * seq_len / 64 - (f - 1))
        mistakes[
            "dynamic NTK: the base is theta * (f * L / max_pos - (f - 1)) ** (D / (D - 2)); "
            "you left out the exponent D / (D - 2)"
        ] = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if scaling and scaling["rope_type"] == "linear":
        mistakes["linear scaling divides inv_freq by the factor (positions / factor); you multiplied"] = (
            expected * scaling["factor"] ** 2
        )
    compare(
        got,
        expected,
        what=f"rope_inv_freq(D={head_dim}, theta={theta:g}, {scaling}, seq_len={seq_len})",
        dims=("D/2",),
        atol=0,
        rtol=1e-5,
        mistakes=mistakes,
    )


def _case_module(
    learner: ModuleType,
    scaling: Optional[dict],
    max_position: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> None:
    config = _config(16, 10000.0, scaling)
    gen = torch.Generator().manual_seed(seed)
    position_ids = torch.randint(0, max_position, (2, 7), generator=gen)
    position_ids[0, -1] = max_position - 1
    x = torch.empty(0, dtype=dtype)
    expected = RotaryEmbedding(config)(x, position_ids)
    got = learner_attr(learner, "RotaryEmbedding")(config)(x, position_ids)
    if not isinstance(got, tuple) or len(got) != 2:
        raise Mismatch("RotaryEmbedding.forward must return a tuple (cos, sin)")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    setting = f"({scaling}, positions up to {max_position - 1}, {dtype})"
    try:
        for name, g, e in (("cos", got[0], expected[0]), ("sin", got[1], expected[1])):
            compare(g, e, what=f"RotaryEmbedding {name} {setting}", dims=("B", "T", "D"), **tol)
    except Mismatch as e:
        if dtype != torch.float32 and _right_in_float32(learner, config, position_ids, expected, dtype):
            raise Mismatch(
                f"{e}; your tables are right for float32 input, so the angles were computed "
                f"in {dtype}: position * inv_freq needs float32 (bf16 keeps about 3 significant "
                "digits, an angle of 40 rad is off by a tenth); compute cos/sin in float32 "
                "and cast only the result to x.dtype"
            ) from None
        raise


def _right_in_float32(
    learner: ModuleType, config: LlamaConfig, position_ids: torch.Tensor, expected, dtype: torch.dtype
) -> bool:
    cos, sin = learner_attr(learner, "RotaryEmbedding")(config)(torch.empty(0), position_ids)
    return all(
        torch.allclose(g.to(dtype).float(), e.float(), atol=1e-2, rtol=1e-2)
        for g, e in ((cos, expected[0]), (sin, expected[1]))
    )


def check(grader: Grader, learner: ModuleType) -> None:
    for seed, shape in enumerate([(2, 3, 5, 8), (1, 2, 4, 64)]):
        grader.case(f"rotate_half {shape}", lambda s=shape, seed=seed: _case_rotate_half(learner, s, seed))
    grader.case("apply_rotary_pos_emb MHA D=16", lambda: _case_apply(learner, 4, 4, 16, 0))
    grader.case("apply_rotary_pos_emb GQA D=64", lambda: _case_apply(learner, 4, 2, 64, 1))
    grader.case("apply_rotary_pos_emb bfloat16", lambda: _case_apply(learner, 2, 1, 32, 2, torch.bfloat16))
    for args in [
        (64, 10000.0, None, None),
        (128, 500000.0, None, None),
        (32, 10000.0, {"rope_type": "linear", "factor": 4.0}, None),
        (32, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 48),
        (32, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 200),
    ]:
        label = f"rope_inv_freq D={args[0]} {args[2]['rope_type'] if args[2] else 'default'}"
        if args[3]:
            label += f" seq_len={args[3]}"
        grader.case(label, lambda a=args: _case_inv_freq(learner, *a))
    grader.case("RotaryEmbedding default", lambda: _case_module(learner, None, 50, 0))
    grader.case("RotaryEmbedding past max_position_embeddings", lambda: _case_module(learner, None, 130, 1))
    grader.case(
        "RotaryEmbedding linear x4",
        lambda: _case_module(learner, {"rope_type": "linear", "factor": 4.0}, 60, 2),
    )
    grader.case(
        "RotaryEmbedding dynamic NTK beyond the context",
        lambda: _case_module(learner, {"rope_type": "dynamic", "factor": 2.0}, 150, 3),
    )
    grader.case("RotaryEmbedding bfloat16 tables", lambda: _case_module(learner, None, 40, 4, torch.bfloat16))
