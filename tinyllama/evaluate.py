"""Evaluation: token-weighted loss and perplexity of a causal LM over batches of (x, y).

Used by the training loop (validation during training) and by the evaluation stage.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from tinyllama.model import causal_lm_loss


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    autocast: Optional[Callable[[], ContextManager]] = None,
) -> Dict[str, float]:
    """Mean cross-entropy per target token over `batches`, and its perplexity.

    batches: (x, y) int64 pairs of shape (B, T), y already aligned with x (the next tokens);
    label -100 in y is ignored. The mean is weighted by tokens, so a short last batch counts
    for what it holds. Under torch.distributed every rank passes its own share of the batches
    and all ranks get the global figures.
    autocast: optional factory of the autocast context the model trains under.
    Returns dict(loss, perplexity, tokens).
    """
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext
    # Sums in float64: thousands of batches of per-token means lose precision in float32.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x).logits  # (B, T, V)
        n = (y != -100).sum()
        loss_sum += causal_lm_loss(logits, y).double() * n
        tokens += n
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(tokens)
    model.train(was_training)
    if tokens.item() == 0:
        raise ValueError("evaluate_loss: no target tokens in the batches (empty validation split?)")
    loss = (loss_sum / tokens).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens.item())}
