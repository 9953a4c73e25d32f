"""Lesson 4: attention and grouped-query attention (GQA).   Read course/en/04-attention.md.

Reference: tinyllama/model/attention.py (repeat_kv, eager_attention, class Attention) and
tinyllama/model/masks.py (build_attention_mask).  Grade with:

    python -m tinyllama.course check 4

Shapes: B batch, T queries, S keys (S = cached + T), H query heads, KV key/value heads,
D head_dim, n_rep = H // KV query heads per key/value head.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Your lesson-3 functions replace this import in the final exercise (`python -m tinyllama.course train`).
from tinyllama.model import KVCache, LlamaConfig, apply_rotary_pos_emb


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV * n_rep, S, D); query head h reads key/value head h // n_rep.

    Same result as torch.repeat_interleave(hidden_states, n_rep, dim=1). Use `expand` on a new
    axis after the KV axis (a stride-0 view, no copy) and then `reshape`. With n_rep == 1 return
    the input unchanged.
    """
    raise NotImplementedError


def causal_mask(query_length: int, key_length: int) -> torch.Tensor:
    """Boolean mask (T, S): True where query t may attend to key s.

    The T queries are the last T of the S positions (the first S - T come from the KV cache), so
    query t sits at position S - T + t and sees keys 0 .. S - T + t, itself included.
    """
    raise NotImplementedError


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scaling + mask) V.

    query (B, H, T, D), key and value (B, H, S, D) (already repeated); attention_mask boolean,
    broadcastable to (B, H, T, S), True = may attend, or None for plain causal attention (build
    it with causal_mask). Blocked scores become torch.finfo(dtype).min before the softmax.
    Returns (output (B, H, T, D), weights (B, H, T, S)), both in query's dtype. Take the softmax
    in float32 (F.softmax(..., dtype=torch.float32)) and cast back.
    """
    raise NotImplementedError


class Attention(nn.Module):
    """Self-attention of one decoder layer, Hugging Face's names: q_proj, k_proj, v_proj, o_proj."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.resolved_num_key_value_heads
        # TODO: the scaling 1 / sqrt(D) and four nn.Linear layers:
        #   q_proj C -> H*D, k_proj C -> KV*D, v_proj C -> KV*D, o_proj H*D -> C,
        #   bias: config.attention_bias on all four (enough for Llama; the reference also
        #   handles Qwen2's q/k/v-only bias).
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """hidden_states (B, T, C), position_embeddings = (cos, sin) each (B, T, D),
        attention_mask boolean (B or 1, 1, T, S), True = may attend, or None (plain causal)
        -> (B, T, C).

        1. project and split heads: (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D) (k, v with KV heads)
        2. rotate q and k with apply_rotary_pos_emb(q, k, cos, sin)
        3. if past_key_values is not None: k, v = past_key_values.update(k, v, self.layer_idx)
        4. repeat k and v to H heads, eager_attention, merge heads back to (B, T, H*D), o_proj
        """
        raise NotImplementedError
