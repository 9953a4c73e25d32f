"""Lesson 7 check: KV cache size against tinyllama/model/cache.py, greedy decoding with the cache
against tinyllama/generate.py, and the top-k / top-p filters (the rules generate.py applies)."""

from __future__ import annotations

from types import ModuleType
from typing import List, Tuple

import torch

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.generate import generate
from tinyllama.model import KVCache, LlamaConfig, LlamaForCausalLM


def _config(heads: int, kv_heads: int, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=heads * 8,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
    )


def _case_cache_bytes(learner: ModuleType, heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    config = _config(heads, kv_heads, layers=3)
    cache = KVCache(config, batch_size=2, max_length=10, dtype=dtype)
    expected = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    nbytes = torch.finfo(dtype).bits // 8
    got = learner_attr(learner, "kv_cache_bytes")(config, 2, 10, nbytes)
    if got != expected:
        mha = expected * heads // kv_heads
        hint = (
            f": that is the size with {heads} key/value heads; the cache stores only the "
            f"KV={kv_heads} heads (GQA's saving), not H"
            if got == mha and heads != kv_heads
            else ": 2 (keys and values) x layers x B x KV x S x D x bytes"
        )
        raise Mismatch(f"kv_cache_bytes = {got}, expected {expected:,}{hint}")


def _case_greedy(learner: ModuleType, kv_heads: int, seed: int) -> None:
    config = _config(4, kv_heads)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(seed))
    calls: List[Tuple[int, bool]] = []  # (tokens fed, a KVCache was passed) per backbone call

    def record(module, args, kwargs):
        has_cache = any(isinstance(a, KVCache) for a in list(args) + list(kwargs.values()))
        calls.append((args[0].shape[1], has_cache))

    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = learner_attr(learner, "greedy_generate")(model, prompt.clone(), 6)
    finally:
        hook.remove()
    uncached = [i for i, (n, has_cache) in enumerate(calls) if i > 0 and n == 1 and not has_cache]
    if uncached:
        raise Mismatch(
            f"call {uncached[0]} fed one token without a cache, so the model saw only that "
            "token: pass use_cache=True on every call (the prefill too) and "
            "past_key_values=out.past_key_values from the previous call"
        )
    expected = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    compare(
        got, expected, what="greedy_generate(prompt (2, 5), 6 new tokens)", dims=("B", "T"), atol=0, rtol=0
    )
    fed = [n for n, _ in calls]
    later = [n for n in fed[1:] if n != 1]
    if later:
        raise Mismatch(
            f"the tokens are right, but the model was fed {fed} tokens per call: after the "
            "prefill, feed only the newest token (B, 1) with past_key_values=out.past_key_values; "
            "the cache already holds the keys and values of everything before it"
        )


def _ref_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _ref_top_p(logits: torch.Tensor, p: float, keep_crossing: bool = True) -> torch.Tensor:
    probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
    above = probs.cumsum(-1) - probs if keep_crossing else probs.cumsum(-1)
    drop_sorted = above >= p if keep_crossing else above > p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _kept(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t)


def _case_top_k(learner: ModuleType, k: int, seed: int) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3
    got = learner_attr(learner, "top_k_filter")(logits.clone(), k)
    expected = _ref_top_k(logits, k)
    if isinstance(got, torch.Tensor) and got.shape == logits.shape:
        if torch.equal(_kept(got), _kept(_ref_top_k(-logits, k))) and k < 50:
            raise Mismatch(
                f"top_k_filter(k={k}) kept the k SMALLEST logits: torch.topk returns the largest by default"
            )
        if not torch.equal(_kept(got), _kept(expected)):
            n = _kept(got).sum(-1).tolist()
            raise Mismatch(
                f"top_k_filter(k={k}) kept {n} tokens per row, expected {k} (the k largest; "
                f"everything below the k-th largest logit becomes -inf)"
            )
    compare(got, expected, what=f"top_k_filter(logits (3, 50), k={k})", dims=("B", "V"))


def _case_top_p(learner: ModuleType, p: float, seed: int, peaked: bool) -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(seed)) * (6 if peaked else 1.5)
    got = learner_attr(learner, "top_p_filter")(logits.clone(), p)
    expected = _ref_top_p(logits, p)
    what = f"top_p_filter(logits (3, 40), p={p})"
    if (
        isinstance(got, torch.Tensor)
        and got.shape == logits.shape
        and not torch.equal(_kept(got), _kept(expected))
    ):
        if torch.equal(_kept(got), _kept(_ref_top_p(logits, p, keep_crossing=False))):
            raise Mismatch(
                f"{what}: you dropped the token whose cumulative probability crosses p; it stays "
                "(keep a token if the tokens ranked ABOVE it sum to less than p), otherwise a "
                "small p can remove every token"
            )
        row = int((_kept(got) != _kept(expected)).any(-1).nonzero()[0])
        raise Mismatch(
            f"{what}: row {row} keeps {int(_kept(got)[row].sum())} tokens, expected "
            f"{int(_kept(expected)[row].sum())} (sort by probability, descending, then cumsum)"
        )
    compare(got, expected, what=what, dims=("B", "V"))


def check(grader: Grader, learner: ModuleType) -> None:
    grader.case("kv_cache_bytes MHA fp32", lambda: _case_cache_bytes(learner, 4, 4, torch.float32))
    grader.case("kv_cache_bytes GQA bf16", lambda: _case_cache_bytes(learner, 4, 2, torch.bfloat16))
    grader.case("greedy_generate with the KV cache (GQA)", lambda: _case_greedy(learner, 2, 0))
    grader.case("greedy_generate with the KV cache (MQA)", lambda: _case_greedy(learner, 1, 1))
    for seed, k in enumerate([5, 1, 50]):
        grader.case(f"top_k_filter k={k}", lambda k=k, s=seed: _case_top_k(learner, k, s))
    for seed, (p, peaked) in enumerate([(0.9, False), (0.5, True), (0.01, False)]):
        grader.case(f"top_p_filter p={p}", lambda p=p, s=seed, pk=peaked: _case_top_p(learner, p, s, pk))
