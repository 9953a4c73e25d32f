"""Rotary position embeddings (RoPE) with the half-split layout and the Llama scaling types.

Channel i of a head (i < D/2) is paired with channel i + D/2, and each pair is rotated by the
angle position * inv_freq[i]. Queries and keys rotated this way make q . k depend only on the
distance between their positions. The frequencies follow transformers' `modeling_rope_utils`
formula by formula, in float32 as it computes them, so the two match to rounding:

- default: inv_freq[i] = 1 / theta^(2i / D)
- linear:  inv_freq / factor (positions squeezed by `factor`)
- dynamic: NTK-aware, the base grows with the sequence once it passes max_position_embeddings:
           theta' = theta * (factor * L / max_pos - (factor - 1)) ^ (D / (D - 2)), L = longest position + 1
- llama3:  long wavelengths (> original_max / low_freq_factor) divided by factor, short ones
           (< original_max / high_freq_factor) kept, the band between smoothly interpolated.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
from torch import nn

if TYPE_CHECKING:  # config.py validates rope_scaling against ROPE_TYPES, so it imports this module
    from tinyllama.model.config import LlamaConfig

# The RoPE types this module computes, each with the rope_scaling keys it needs (the same as
# transformers' rope validation): the one list that config validation and checkpoint import read.
ROPE_TYPES: Dict[str, Tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def compute_inv_freq(
    config: LlamaConfig, seq_len: Optional[int] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Inverse frequencies (D/2,) in float32 for the config's rope_scaling.

    seq_len only matters for "dynamic": the length the frequencies must cover.
    """
    dim = config.resolved_head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        # A 0-dim int64 tensor, as transformers uses, makes this arithmetic float32 like theirs.
        length = torch.tensor(seq_len, dtype=torch.int64, device=device)
        factor = scaling["factor"]
        base = base * ((factor * length / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling (wavelengths in tokens)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, cached in float32 and grown on demand.

    The cache starts at max_position_embeddings rows and doubles whenever a position past its
    end is asked for, so generation beyond the trained context still works. "dynamic" scaling
    depends on the sequence length, so past max_position_embeddings it computes cos/sin for the
    call instead of caching them. (transformers keeps the largest dynamic base seen until a short
    call resets it; we recompute per call: the same for any single forward pass.)
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_scaling or {"rope_type": "default"})["rope_type"]
        self.register_buffer("inv_freq", compute_inv_freq(config), persistent=False)
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)
        self._build_cache(config.max_position_embeddings)

    @torch.no_grad()
    def _build_cache(self, length: int) -> None:
        device = self.inv_freq.device
        # Recomputed from the config: a model cast to bf16 would have rounded the old buffers.
        self.inv_freq = compute_inv_freq(self.config, device=device)
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)  # (L, D/2): angle of each pair
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, D): half-split layout, pairs (i, i + D/2)
        self.cos_cached, self.sin_cached = emb.cos(), emb.sin()

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, max_position: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, D) in x's dtype for position_ids (B, T).

        max_position: 1 + the largest position, when the caller knows it (saves a device sync).
        """
        if max_position is None:
            max_position = int(position_ids.max()) + 1
        tables = self.tables(max_position)
        if tables is None:  # dynamic scaling past the context: angles for this length only
            inv_freq = compute_inv_freq(self.config, max_position, device=x.device)
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        cos, sin = tables
        return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)

    @torch.no_grad()
    def tables(self, max_position: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The cached float32 cos/sin tables (L, D), L >= max_position, grown when too short; None
        when "dynamic" scaling passes max_position_embeddings, where the angles depend on the
        sequence length and `forward` computes them per call."""
        if self.rope_type == "dynamic" and max_position > self.config.max_position_embeddings:
            return None
        if max_position > self.cos_cached.shape[0] or self.cos_cached.dtype != torch.float32:
            self._build_cache(max(max_position, 2 * self.cos_cached.shape[0]))
        return self.cos_cached, self.sin_cached


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): [x1, x2] -> [-x2, x1], the 90-degree turn of each (i, i + D/2) pair."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, H_kv, T, D) by cos/sin (B, T, D).

    unsqueeze_dim=1 adds the head axis to cos/sin so one table serves every head.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
