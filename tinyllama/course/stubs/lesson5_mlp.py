"""Lesson 5: the SwiGLU MLP.   Read course/en/05-mlp.md (Chinese: course/zh/05-mlp.md).

Reference: tinyllama/model/mlp.py, class MLP.  Grade with:

    python -m tinyllama.course check 5

Keep the class name, the constructor signature and the three projection names: the check loads
the reference's weights into your module, and the final exercise builds the real model with it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinyllama.model import LlamaConfig


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); widths C -> I -> C."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        # TODO: three nn.Linear layers named gate_proj (C -> I), up_proj (C -> I) and
        # down_proj (I -> C), with C = config.hidden_size, I = config.intermediate_size and
        # bias=config.mlp_bias.
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). The gate goes through silu (F.silu); the up branch does not."""
        raise NotImplementedError
