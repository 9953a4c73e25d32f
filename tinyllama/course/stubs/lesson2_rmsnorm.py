"""Lesson 2: RMSNorm.   Read course/en/02-rmsnorm.md (Chinese: course/zh/02-rmsnorm.md).

Reference: tinyllama/model/norm.py, class RMSNorm.  Grade with:

    python -m tinyllama.course check 2

Keep the class name, the constructor signature and the parameter name `weight`: the check loads
the reference's weights into your module, and the final exercise builds the real model with it.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2 over the last dim) + eps) * weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        # TODO: a learnable gain `self.weight` of shape (hidden_size,), initialised to ones,
        # and keep eps for forward.
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, T, C) in any float dtype -> (B, T, C) in the same dtype.

        Compute the mean of squares and the reciprocal square root in float32 (squares of large
        fp16 activations overflow), cast back to the input dtype, then multiply by weight.
        """
        raise NotImplementedError
