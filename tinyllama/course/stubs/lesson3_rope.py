"""Lesson 3: rotary position embeddings (RoPE).   Read course/en/03-rope.md (Chinese: course/zh/).

Reference: tinyllama/model/rotary.py: rotate_half, apply_rotary_pos_emb, compute_inv_freq and
class RotaryEmbedding.  Grade with:

    python -m tinyllama.course check 3

Layout: half-split, as Hugging Face's Llama. Channel i of a head (i < D/2) is paired with channel
i + D/2, and the pair is rotated by the angle position * inv_freq[i].
"""

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
    """Inverse frequencies (D/2,) in float32.

    default: inv_freq[i] = 1 / theta ** (2i / D) for i = 0 .. D/2 - 1
    rope_scaling = {"rope_type": "linear", "factor": f}: inv_freq / f
    rope_scaling = {"rope_type": "dynamic", "factor": f}: when seq_len > max_position_embeddings,
        first replace theta by theta * (f * seq_len / max_position_embeddings - (f - 1)) ** (D / (D - 2));
        otherwise the default.
    """
    raise NotImplementedError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) -> (..., D): with x1 = x[..., :D/2] and x2 = x[..., D/2:], return [-x2, x1]."""
    raise NotImplementedError


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k (B, KV, T, D), cos and sin (B, T, D) -> rotated (q, k), same shapes.

    Add the head axis to cos/sin at unsqueeze_dim so one table serves every head, then
    x * cos + rotate_half(x) * sin for x in (q, k).
    """
    raise NotImplementedError


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a batch (the model calls it once per forward)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        # Head width D: config.resolved_head_dim; base: config.rope_theta; scaling:
        # config.rope_scaling (None or a dict); context: config.max_position_embeddings.
        self.config = config

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, max_position: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, T, D) in x's dtype.

        max_position: 1 + the largest position (None: compute it from position_ids); it is the
        seq_len of the dynamic scaling. Angles: position * inv_freq (B, T, D/2), duplicated to
        (B, T, D) with torch.cat((freqs, freqs), dim=-1). Compute angles in float32.
        """
        raise NotImplementedError
