"""Reference solution of lesson 5."""

import torch
import torch.nn.functional as F
from torch import nn

from tinyllama.model import LlamaConfig


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(c, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(c, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, c, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
