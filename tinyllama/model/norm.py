"""RMSNorm: scale each token's vector to unit root-mean-square, then by a learned gain.

Unlike LayerNorm there is no mean subtraction and no bias: y = x / sqrt(mean(x^2) + eps) * weight.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension (Llama's `LlamaRMSNorm`).

    The statistics are computed in float32 even for bf16/fp16 inputs (squares of large
    activations overflow fp16 and lose precision in bf16); the result is cast back to the
    input dtype before the gain is applied, exactly as Hugging Face does.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), same dtype as the input."""
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
