"""The SwiGLU feed-forward block: down(act(gate(x)) * up(x))."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # config.py validates hidden_act against ACTIVATIONS, so it imports this module
    from tinyllama.model.config import LlamaConfig

# hidden_act name -> module (the names transformers' ACT2FN uses).
ACT2CLS = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}
ACTIVATIONS = tuple(ACT2CLS)  # the accepted values of hidden_act: exactly those the MLP can build


class MLP(nn.Module):
    """Gated MLP (Llama's `LlamaMLP`). The gate decides, per channel, how much of `up` passes;
    with silu this is SwiGLU. Widths: C -> intermediate_size -> C."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(c, i, bias=bias)
        self.up_proj = nn.Linear(c, i, bias=bias)
        self.down_proj = nn.Linear(i, c, bias=bias)
        self.act_fn = ACT2CLS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
