"""Reference solution of lesson 10."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        z = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        h = chosen / chosen_tokens - rejected / rejected_tokens
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return advantages
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
    else:
        std = rewards.std()
    return advantages / (std + 1e-4)


def completion_mask(completion_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    is_end = (completion_ids == end_id).long()
    return (is_end.cumsum(dim=1) - is_end == 0).float()


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: str = "dapo",
    max_new_tokens: Optional[int] = None,
    beta: float = 0.0,
    ref_logps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + high) * A)
    if beta > 0:
        delta = ref_logps - logps
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * (max_new_tokens or mask.shape[1]))
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
