"""Lesson 8: training a tiny model end to end.   Read course/en/08-training.md.

Reference: tinyllama/model/heads.py (causal_lm_loss, and the `labels=` path of
LlamaForCausalLM.forward), tinyllama/train/loop.py (the real loop).  Grade with:

    python -m tinyllama.course check 8

Then the final exercise, your lessons 2-5 inside the real model:

    python -m tinyllama.course train
"""

import torch


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against aligned targets (B, T) -> scalar float32.

    targets[b, t] is the token that should follow position t; positions whose target is
    ignore_index are left out of the mean. Compute in float32 even for bf16 logits.
    """
    raise NotImplementedError


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels (B, T) (a copy of input_ids, -100 where no loss is wanted) -> targets (B, T):
    targets[:, t] = labels[:, t + 1], and the last position, which has no next token, gets
    ignore_index."""
    raise NotImplementedError


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    """One optimizer step on a batch x, y (B, T) (y = x shifted by one, as the loader gives).

    Forward to logits, your causal_lm_loss, backward, step; leave no gradient behind for the
    next step. Returns the loss as a Python float.
    """
    raise NotImplementedError
