"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules.

The schedule is a `torch.optim.lr_scheduler.LambdaLR` over `lr_multiplier`, so it resumes
through LambdaLR's own state_dict (its step counter); the multiplier is a pure function of
the step, which keeps resumed runs on exactly the same learning rates.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List

import torch
from torch import nn

from tinyllama.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Split trainable parameters: weight decay on matrices of linear layers only.

    Norm weights and biases (1-D) and embeddings are not decayed: decay pulls them toward zero,
    which for a norm gain or a token embedding is no regularisation, only damage (GPT-3, Llama).
    A tied lm_head shares the embedding tensor, and parameters() lists it once.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel (one pass over all parameters instead of a
    chain of per-tensor ops): faster than the default on CPU too (BENCHMARKS.md), equal to fp32
    rounding."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type in ("cuda", "cpu"),
    )


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based) as a fraction of cfg.lr.

    All schedules warm up linearly over cfg.warmup_steps (step 0 gets lr / warmup, not 0, so no
    step is wasted). Then:
      cosine:   cosine decay from 1 to min_lr_ratio at max_steps;
      wsd:      stable at 1, then a linear decay to min_lr_ratio over the last decay_fraction of steps;
      constant: 1.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(cfg.decay_fraction * max_steps)))
        decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown optim.schedule {cfg.schedule!r}")


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimizer step; `scheduler.get_last_lr()[0]` is the current lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_multiplier, cfg=cfg, max_steps=max_steps)
    )
