"""Multi-head self-attention with grouped key/value heads (MHA, GQA, MQA), two implementations:

- "eager": the formulas written out, softmax(Q K^T / sqrt(D) + mask) V, the path to read;
- "sdpa": torch's fused scaled_dot_product_attention, same result, faster, less memory.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tinyllama.model.cache import KVCache
from tinyllama.model.config import LlamaConfig
from tinyllama.model.masks import build_attention_mask, to_additive
from tinyllama.model.rotary import apply_rotary_pos_emb


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D): each key/value head serves n_rep query heads.

    Same result as torch.repeat_interleave(x, n_rep, dim=1). `expand` makes the repeated axis a
    stride-0 view (no memory), so the only copy is the one `reshape` needs to merge the axes;
    with n_rep == 1 (MHA) nothing is copied at all.
    """
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k/v (B, H, S, D), boolean mask (B|1, 1, T, S) or None (plain causal).

    Returns the output (B, H, T, D) and the attention weights (B, H, T, S).
    """
    if attention_mask is None and query.shape[2] > 1:
        past = key.shape[2] - query.shape[2]
        attention_mask = build_attention_mask(None, query.shape[2], past, query.device)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + to_additive(attention_mask, scores.dtype)
    # float32 softmax: exp of bf16/fp16 scores loses the small probabilities.
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value), weights


class Attention(nn.Module):
    """Self-attention of one decoder layer (`LlamaAttention` / `Qwen2Attention`).

    Biases: Llama puts one on q, k, v and o when attention_bias; Qwen2 always on q, k, v, never on o.
    Qwen2 layers with index >= max_window_layers attend only within sliding_window (the model
    builds that layer's mask; `self.sliding_window` records it).
    """

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.resolved_num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5  # 1 / sqrt(D) keeps q.k at unit scale
        self.attention_dropout = config.attention_dropout
        self.attn_implementation = config.attn_implementation
        self.sliding_window = config.sliding_window if config.uses_sliding_window(layer_idx) else None
        qkv_bias = config.attention_bias or config.model_type == "qwen2"
        c, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(c, self.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(c, self.num_key_value_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(c, self.num_key_value_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, c, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """hidden_states (B, T, C); cos/sin (B, T, D); boolean mask (B|1, 1, T, S), True = may
        attend (see masks.py), or None -> (B, T, C).

        A None mask means plain causal attention (no padding, no window, queries at the end).
        """
        bsz, q_len, _ = hidden_states.shape
        # (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D): heads become a batch axis.
        q = self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, H_kv, S, D), S = past + T
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        dropout = self.attention_dropout if self.training else 0.0
        if self.attn_implementation == "eager":
            out, _ = eager_attention(q, k, v, attention_mask, self.scaling, dropout, self.training)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask,
                dropout_p=dropout,
                is_causal=attention_mask is None and q_len > 1,
                scale=self.scaling,
            )
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)  # (B, T, H*D)
        return self.o_proj(out)
