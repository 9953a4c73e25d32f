"""Reference solution of lesson 4."""

import torch
import torch.nn.functional as F
from torch import nn

from tinyllama.model import LlamaConfig, apply_rotary_pos_emb


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return hidden_states
    b, kv, s, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def causal_mask(query_length: int, key_length: int) -> torch.Tensor:
    past = key_length - query_length
    return torch.ones(query_length, key_length, dtype=torch.bool).tril(past)


def eager_attention(query, key, value, attention_mask, scaling):
    if attention_mask is None:
        attention_mask = causal_mask(query.shape[2], key.shape[2])
    scores = query @ key.transpose(-1, -2) * scaling
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return weights @ value, weights


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.resolved_num_key_value_heads
        self.scaling = self.head_dim**-0.5
        c, d, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(c, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(c, self.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(c, self.num_key_value_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, c, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None):
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        n_rep = self.num_heads // self.num_key_value_heads
        out, _ = eager_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attention_mask, self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
