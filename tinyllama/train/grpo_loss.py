"""GRPO's arithmetic: group-relative advantages and the clipped, token-level policy loss.

For each prompt the policy samples a group of G completions; each gets a scalar reward. GRPO
needs no value model: a completion's advantage is how much better it did than its own group,

    A_i = (r_i - mean(r_group)) / (std + 1e-4)      std: the group's, the batch's, or 1 ("none")

so a group whose rewards are all equal (all right, or all wrong) teaches nothing. Every token of
completion i then carries A_i in PPO's clipped objective, with the ratio to the policy that
sampled it (`old_logps`; equal to the current policy on the first update of a rollout batch):

    ratio_t = exp(logp_t - old_logp_t)
    loss_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps_high) * A_i) + beta * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (k3: unbiased, always >= 0)

and the per-token losses become one number in one of three ways (`loss_type`):

- "grpo": the mean over each completion's tokens, then over completions (a long completion's
  tokens each weigh less: the length bias Dr. GRPO points out);
- "dr_grpo": the sum over all tokens / (completions x max_new_tokens), a constant;
- "dapo": the sum over all tokens / the number of completion tokens in the batch.

Shapes: N = prompts x G completions, L = the longest completion's length.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """rewards (N,) float, N = prompts x group_size with a prompt's completions adjacent ->
    advantages (N,): the reward minus its group's mean, divided by the group's std ("group"), the
    whole batch's std ("batch") or nothing ("none"). Stds are unbiased (torch's default)."""
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return advantages
    else:
        raise ValueError(f"scale_rewards={scale!r}: use group, batch or none")
    return advantages / (std + 1e-4)


def completion_mask(completion_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """completion_ids (N, L) -> (N, L) float, 1 on each completion's tokens up to and including
    its first end_id (all of them if it never ends), 0 after: what the model chose to write."""
    is_end = completion_ids == end_id
    # Tokens before the first end: no end among the tokens strictly before them.
    ends_before = is_end.long().cumsum(dim=1) - is_end.long()
    return (ends_before == 0).float()


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
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The GRPO loss of one rollout batch (module docstring).

    logps (N, L): the policy's log-probabilities of the sampled tokens (with gradient);
    old_logps (N, L): the sampling policy's (no gradient); advantages (N,); mask (N, L) of 1/0;
    ref_logps (N, L): the reference model's, needed when beta > 0; max_new_tokens: dr_grpo's
    constant (default L). Returns (loss, stats): stats hold detached scalars "clip_ratio" (share
    of tokens whose ratio the clip holds back), "kl" (mean k3 per token; 0 without beta).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    A = advantages[:, None]  # (N, 1): every token of a completion carries its advantage
    per_token = -torch.min(ratio * A, clipped * A)
    kl = torch.zeros_like(per_token)
    if beta > 0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_new_tokens or mask.shape[1]))
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / tokens
    else:
        raise ValueError(f"loss_type={loss_type!r}: use grpo, dr_grpo or dapo")
    with torch.no_grad():
        held = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + high) & (A > 0))
        stats = {"clip_ratio": (held.float() * mask).sum() / tokens, "kl": (kl * mask).sum() / tokens}
    return loss, stats
