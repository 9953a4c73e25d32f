"""Reference solution of lesson 3."""

from typing import Optional, Tuple

import torch
from torch import nn

from tinyllama.model import LlamaConfig


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_scaling: Optional[dict] = None,
    seq_len: Optional[int] = None,
    max_position_embeddings: int = 2048,
) -> torch.Tensor:
    kind = (rope_scaling or {}).get("rope_type", "default")
    if kind == "dynamic" and seq_len is not None and seq_len > max_position_embeddings:
        f = rope_scaling["factor"]
        theta = theta * (f * seq_len / max_position_embeddings - (f - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if kind == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config

    @torch.no_grad()
    def forward(self, x, position_ids, max_position=None):
        c = self.config
        if max_position is None:
            max_position = int(position_ids.max()) + 1
        inv_freq = rope_inv_freq(
            c.resolved_head_dim, c.rope_theta, c.rope_scaling, max_position, c.max_position_embeddings
        ).to(x.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
