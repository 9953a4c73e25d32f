"""Sampling from a causal LM with a preallocated KV cache.

One prefill pass of the model over the prompt fills the cache (its forward with
logits_to_keep=1: the head runs on the last position only); each further step feeds one token
per row, so a step costs one position, not a re-run of the prefix. On a CPU those steps run
through fast_decode.py's FastDecoder (the same math, compiled or in NumPy, on weights packed for
decoding); elsewhere through the model; a DEBUG line of the logger tinyllama.generate says which.
The cache is sized for prompt + max_new_tokens up front and written in place, and the loop keeps
per-token Python work to a handful of tensor ops (no mask rebuilds, no host syncs except the EOS
check).

    from tinyllama.generate import generate
    ids = generate(model, input_ids, max_new_tokens=200, temperature=0.8, top_p=0.95, seed=0)

Batches of prompts of different lengths are left-padded: pass `attention_mask` (1 for real
tokens, 0 for padding) and each row gets the positions and the output it would get alone.
`stream_tokens` yields the new tokens step by step (the sample stage, tinyllama/sample.py, prints
them as they come; training's samples.txt is written through `generate`).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from tinyllama.config import SAMPLE_WEIGHTS
from tinyllama.errors import ConfigError
from tinyllama.fast_decode import FastDecoder
from tinyllama.model import KVCache

logger = logging.getLogger(__name__)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = 0.95,
    repetition_penalty: float = 1.0,
    eos_token_id: Optional[int] = None,
    seed: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    fast: bool = True,
    num_return_sequences: int = 1,
    weights: str = "float32",
) -> torch.Tensor:
    """Continue each prompt row of `input_ids` (B, T) by up to `max_new_tokens` tokens.

    temperature 0 is greedy (argmax; top_k/top_p are then irrelevant). top_k keeps the k most
    likely tokens, top_p the smallest set of most likely tokens whose probability reaches p.
    repetition_penalty > 1 divides positive logits (multiplies negative ones) of every token
    already in the row, prompt included, as transformers does. Generation stops once every row
    has produced `eos_token_id`; a row that finished early is filled with it afterwards.
    seed makes sampling reproducible (None: torch's global RNG). Each row draws one number of
    the generator per step, in row order; once finished rows leave the batch the rows after them
    draw other numbers than they would have, so a sampled row depends on when the rows beside it
    end (always in the same way for the same inputs).
    attention_mask (B, T): 1 for real tokens, 0 for left padding.
    fast: after the prompt, run each step through fast_decode.py (the same math, compiled or in
    NumPy, on weights packed for decoding; float32 CPU models); False runs the model's own
    forward at every step.
    num_return_sequences: continuations sampled per prompt. The prompts are prefilled once and
    their cache copied to each continuation's row, so G samples of one prompt cost one prefill
    (GRPO's rollouts); the rows come out grouped, prompt 0's G first.
    weights: "float32", or "int8" for the fast path's int8 weight-only matrices (one scale per
    output channel; CPU float32 models only: the prefill still runs the model in float32).
    Returns (B x num_return_sequences, T + n) int64, n <= max_new_tokens: the prompts followed
    by the new tokens.
    """
    B, T = input_ids.shape
    out = input_ids.new_empty(B * num_return_sequences, T + max_new_tokens)
    out[:, :T] = input_ids.repeat_interleave(num_return_sequences, dim=0)
    n = 0
    for n, tokens in enumerate(
        stream_tokens(
            model,
            input_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            eos_token_id,
            seed,
            attention_mask,
            fast,
            num_return_sequences,
            weights,
        ),
        1,
    ):
        out[:, T + n - 1] = tokens
    return out[:, : T + n]


def stream_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = 0.95,
    repetition_penalty: float = 1.0,
    eos_token_id: Optional[int] = None,
    seed: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    fast: bool = True,
    num_return_sequences: int = 1,
    weights: str = "float32",
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B x num_return_sequences,) int64, one step at a time
    (arguments as `generate`).

    Rows that produced `eos_token_id` stop costing compute: once they are half of the rows still
    decoded, their cache rows are dropped (halving at most, so the copies cost less than one
    copy of the cache in all). Grad mode is left as the caller has it (the prefill and the
    model's own steps run under no_grad; the fast path builds no graph), because a generator
    decorated with a grad mode switches it at every step."""
    _check_args(
        input_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        num_return_sequences,
        weights,
    )
    check_weights(model, fast, weights)
    if max_new_tokens == 0:
        return
    B, T = input_ids.shape
    device = input_ids.device
    config = model.config
    dtype = next(model.parameters()).dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded:
        # Left padding shifts each row's tokens right; positions count real tokens only, so a
        # padded row sees the same RoPE angles it would see alone. The mask buffer covers the
        # whole generation (new tokens are always real) and is sliced, never rebuilt.
        mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=device)
        mask[:, :T] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        next_position = attention_mask.long().sum(-1, keepdim=True)  # (B, 1)
    else:  # the model counts positions from the cache length itself (no host sync)
        mask = position_ids = next_position = None
    # Tokens already in each row, for the repetition penalty: (B, V) bool, padding excluded.
    seen = None
    if repetition_penalty != 1.0:
        real = attention_mask.long() if attention_mask is not None else torch.ones_like(input_ids)
        counts = torch.zeros(B, config.vocab_size, dtype=torch.long, device=device)
        seen = counts.scatter_add_(1, input_ids, real) > 0
    cache = KVCache(config, batch_size=B, max_length=T + max_new_tokens, device=device, dtype=dtype)
    # The prompt goes through the model (a prefill is compute-bound: GEMMs and attention kernels).
    logits = model_logits(model, input_ids, mask[:, :T] if padded else None, position_ids, cache)
    if num_return_sequences > 1:  # from here on each prompt's row is G rows
        G = num_return_sequences
        B, logits = B * G, logits.repeat_interleave(G, dim=0)
        cache.repeat_interleave(G)
        if padded:
            mask, next_position = mask.repeat_interleave(G, dim=0), next_position.repeat_interleave(G, dim=0)
        if seen is not None:
            seen = seen.repeat_interleave(G, dim=0)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # Once finished rows have been dropped: which of the B rows are still decoded, and the
    # tokens yielded for all B (a dropped row keeps emitting EOS).
    rows: Optional[torch.Tensor] = None
    all_tokens = None
    step_logits = None  # chosen at the first step: a single new token needs no decoding step
    for step in range(max_new_tokens):
        tokens = next_token(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(finished, eos_token_id)
            finished |= tokens == eos_token_id
        yield tokens if rows is None else all_tokens.index_copy(0, rows, tokens)
        if step == max_new_tokens - 1:
            return
        if eos_token_id is not None:
            done = int(finished.sum())
            if done == len(finished):
                return
            if 2 * done >= len(finished):  # drop the finished rows from the batch
                keep = (~finished).nonzero()[:, 0]
                if rows is None:
                    all_tokens = torch.full((B,), eos_token_id, dtype=torch.long, device=device)
                rows = keep if rows is None else rows[keep]
                cache.select_rows(keep)
                tokens, finished = tokens[keep], finished[keep]
                if padded:
                    mask, next_position = mask[keep], next_position[keep]
                if seen is not None:
                    seen = seen[keep]
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if step_logits is None:
            step_logits = decoding_step(model, fast, weights)
        logits = step_logits(
            tokens[:, None], mask[:, : T + step + 1] if padded else None, next_position, cache
        )
        if padded:
            next_position = next_position + 1


def check_weights(model: nn.Module, fast: bool, weights: str) -> None:
    """Refuse quantized weights where the fast path does not decode (they exist only there)."""
    reason = FastDecoder.unsupported(model) if fast else "fast=False"
    if weights != "float32" and reason is not None:
        raise ConfigError(
            f"sample.weights={weights} runs on the CPU decoding path, which cannot decode this "
            f"model ({reason}): use sample.weights=float32"
        )


def decoding_step(model: nn.Module, fast: bool, weights: str = "float32") -> Callable[..., torch.Tensor]:
    """What runs each step after the prefill, logged by name: fast_decode's FastDecoder (the
    model's math, compiled or in NumPy, on weights packed for decoding in `weights`) where it
    supports the model and `fast` allows it, else the model's own forward (GPUs, other dtypes,
    parts that path does not know)."""
    reason = FastDecoder.unsupported(model) if fast else "fast=False"
    if reason is None:
        decoder = FastDecoder.for_model(model, weights)
        logger.debug(
            "decoding steps run through fast_decode.FastDecoder (%s, packed %s weights)",
            decoder.backend,
            weights,
        )
        return decoder
    logger.debug("decoding steps run through the model's forward (%s)", reason)
    return functools.partial(model_logits, model)


@torch.no_grad()
def model_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    cache: KVCache,
) -> torch.Tensor:
    """Logits of the last position only, (B, V) float32: the backbone runs on all T positions
    (filling the cache), the (C -> V) head only on the last (logits_to_keep=1), so a prefill
    does not pay T x V for logits it would throw away."""
    out = model(
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    repetition_penalty: float,
    seen: Optional[torch.Tensor],
    generator: Union[None, torch.Generator, Sequence[torch.Generator]],
    uniforms: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Pick one token per row from float32 logits (B, V); the order follows transformers'
    processors: repetition penalty, temperature, top-k, top-p. Returns (B,) int64.

    generator: one for the whole batch (None: torch's global RNG), or one per row (the server's
    requests, each with its own seed). Either way each row's draw uses one uniform number from
    its generator (`draw`), so a row sampled beside others gets what it gets alone. uniforms:
    each row's number, drawn by the caller instead (then generator is not used)."""
    if seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = _top_p_filter(probs, top_p)
    return draw(probs, generator, uniforms)


def draw(
    probs: torch.Tensor,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]],
    uniforms: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """One token per row of probs (B, V), by inverse transform sampling: a uniform u in [0, 1)
    per row, and the first token whose cumulative probability exceeds u times the row's total.
    Returns (B,) int64.

    One vectorised search for the whole batch instead of a multinomial draw per row: rows with
    generators of their own cost one `torch.rand` each. A token of probability 0 is never drawn
    (its cumulative sum equals its predecessor's, and the comparison is strict)."""
    B = probs.shape[0]
    if uniforms is not None:
        if len(uniforms) != B:
            raise ValueError(f"{len(uniforms)} uniform numbers for {B} rows")
        u = torch.tensor(uniforms, dtype=torch.float64, device=probs.device)[:, None]
    elif generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(B, 1, generator=generator, device=probs.device)
    else:
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])[:, None]
    # float64: summed in float32, a tiny probability late in a large vocabulary rounds to nothing
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (B, V)
    total = cdf[:, -1:]
    # u * total can round up to total itself; the largest float below it keeps the search inside.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # clamped: a row that is not finite (a diverged model) still gives a token id
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= top_p (the most
    likely token always stays; a token tied with the least likely kept one stays too, as top-k
    keeps its ties); the others' probabilities become 0 (`draw` needs no renormalised rows).
    probs (B, V) -> (B, V).

    Only the probabilities are sorted, not their indices: the cut is a threshold, the smallest
    probability kept. On the CPU NumPy sorts them (its SIMD sort is an order of magnitude faster
    than torch.sort with indices there: BENCHMARKS.md, generation)."""
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        descending = torch.from_numpy(-np.sort(-probs.numpy(), axis=-1))
    else:
        descending = torch.sort(probs, dim=-1, descending=True).values
    # A token stays if the tokens ranked above it sum to less than top_p: the first one, and one
    # more for each partial sum below top_p (a running sum of non-negative numbers never
    # decreases, so a binary search counts them; a parallel scan's rounding can only move the
    # cut by a token of equal standing).
    above = descending.cumsum(dim=-1)  # (B, V): what the tokens up to each rank sum to
    target = torch.full((len(above), 1), top_p, dtype=above.dtype, device=above.device)
    kept = (torch.searchsorted(above, target) + 1).clamp_(max=above.shape[-1])  # (B, 1)
    threshold = descending.gather(-1, kept - 1)  # the smallest probability kept
    return probs.masked_fill(probs < threshold, 0.0)


def _check_args(
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    repetition_penalty: float,
    num_return_sequences: int = 1,
    weights: str = "float32",
) -> None:
    """Reject values that would fail deep inside torch (or silently do something else)."""
    problems: List[str] = []
    if weights not in SAMPLE_WEIGHTS:
        problems.append(f"weights={weights!r}: expected one of {', '.join(SAMPLE_WEIGHTS)}")
    if num_return_sequences < 1:
        problems.append(f"num_return_sequences={num_return_sequences}: must be >= 1")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        problems.append(f"input_ids of shape {tuple(input_ids.shape)}: need (B, T) with T >= 1")
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if temperature < 0:
        problems.append(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k={top_k}: must be >= 1 (or None)")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p={top_p}: must be in (0, 1] (or None)")
    if repetition_penalty <= 0:
        problems.append(f"repetition_penalty={repetition_penalty}: must be > 0 (1 disables it)")
    if problems:
        raise ConfigError("generate: " + "; ".join(problems))
