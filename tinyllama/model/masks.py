"""Which keys each query may attend to, as a boolean mask (True = may attend).

Boolean, so one mask serves every dtype (autocast included): sdpa takes it as is, and the eager
path turns it into the additive form of the course notes (0 or dtype-min added to the scores).
"""

from __future__ import annotations

from typing import Optional

import torch


def build_attention_mask(
    attention_mask: Optional[torch.Tensor],
    query_length: int,
    past_length: int,
    device: torch.device,
    sliding_window: Optional[int] = None,
    allow_implicit_causal: bool = False,
) -> Optional[torch.Tensor]:
    """Mask of shape (B or 1, 1, T, S) for T queries over S = past_length + T keys.

    attention_mask: (B, S) with 1 for real tokens and 0 for padding (left or right), covering the
        cached positions too; None means no padding. A 4D boolean mask (B or 1, 1, T, S) is
        returned as is (as transformers does): the caller built it, e.g. `segment_attention_mask`.
    Query t sits at cache index past_length + t; it may see key s when s <= that index (causal),
    s is not padding, and, with a sliding window W, s > index - W (the last W keys, itself included).
    Indices are cache slots, not position_ids: left padding shifts positions, not slots.

    With allow_implicit_causal (sdpa), returns None when the mask is plain causal and aligned so
    that sdpa's is_causal flag gives it without materialising (T, S): no padding, no window, and
    either an empty cache or a single query.
    """
    if attention_mask is not None and attention_mask.dim() == 4:  # already (B|1, 1, T, S), e.g. packed
        return attention_mask.bool()
    kv_length = past_length + query_length
    if attention_mask is not None and attention_mask.shape[-1] != kv_length:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns; it must cover the "
            f"{past_length} cached and {query_length} new positions ({kv_length})"
        )
    if (
        allow_implicit_causal
        and attention_mask is None
        and sliding_window is None
        and (past_length == 0 or query_length == 1)
    ):
        return None
    q_index = torch.arange(past_length, kv_length, device=device)[:, None]  # (T, 1)
    k_index = torch.arange(kv_length, device=device)[None, :]  # (1, S)
    allowed = k_index <= q_index
    if sliding_window is not None:
        allowed = allowed & (k_index > q_index - sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return allowed


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> 0 where allowed, dtype-min where not, to add to the attention scores.

    dtype-min rather than -inf keeps rows that see nothing (the padding queries of a left-padded
    batch) finite: they become a uniform average instead of NaN, and nobody reads them.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) for windows that pack several sequences.

    segment_ids: (B, T), the same id > 0 on the tokens of one sequence, 0 on padding. A token may
    see the earlier tokens of its own sequence only, so packed sequences never attend to each
    other. A padding token sees itself alone: a row that sees nothing would make sdpa's softmax
    NaN, and a NaN there poisons the gradients even though no loss is taken on it.
    """
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    real = (segment_ids != 0)[:, None, :]  # (B, 1, T): keys that are tokens
    itself = torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    return ((same & causal & real) | itself)[:, None]  # (B, 1, T, T)
