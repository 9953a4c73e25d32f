"""Lesson 10: preference and reward training (DPO, GRPO).   Read course/en/10-post_training.md.

Reference: tinyllama/dpo.py (dpo_loss), tinyllama/train/grpo_loss.py (group_advantages,
completion_mask, grpo_loss).  Grade with:

    python -m tinyllama.course check 10
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F  # F.logsigmoid: log sigmoid(x) without overflow


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
    """B preference pairs -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).

    The four inputs (B,) float32 are summed log-probs of the replies, log pi(y|x), under the
    policy (with gradient) and the frozen reference. A reply's log-ratio is policy minus
    reference; its reward is beta x its log-ratio, detached (a figure to log, not a path for
    gradients). z = beta x (chosen log-ratio - rejected log-ratio).

    "sigmoid": losses = -(1 - label_smoothing) log sigmoid(z) - label_smoothing log sigmoid(-z)
               (label_smoothing 0: the DPO paper's -log sigmoid(z));
    "ipo":     each log-ratio divided by its reply's token count (chosen_tokens, rejected_tokens
               (B,) int64), h = chosen's - rejected's, losses = (h - 1 / (2 beta)) ** 2.
    """
    raise NotImplementedError


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """rewards (N,) float32, N = prompts x group_size, each prompt's completions adjacent ->
    advantages (N,): the reward minus its own group's mean, divided by std + 1e-4 where std is the
    group's ("group") or the whole batch's ("batch"), not divided at all for "none". Stds are
    unbiased (torch's default .std())."""
    raise NotImplementedError


def completion_mask(completion_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """completion_ids (N, L) int64 -> mask (N, L) float32: 1 on each completion's tokens up to
    and including its first end_id (every token if it never ends), 0 after it."""
    raise NotImplementedError


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
    """The GRPO loss of one rollout batch -> a scalar float32 tensor (with gradient).

    logps (N, L): the policy's log-probs of the sampled tokens (with gradient); old_logps (N, L):
    the sampling policy's; advantages (N,); mask (N, L) of 1/0 (completion_mask); ref_logps
    (N, L): the reference's, used when beta > 0.

    Per token: ratio = exp(logps - old_logps); with A the completion's advantage,
        loss_t = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL_t
    epsilon_high None means epsilon; KL_t = exp(ref - logp) - (ref - logp) - 1 (k3).
    Then one number, counting only the tokens of the mask:
        "grpo":    the mean over each completion's tokens, then the mean over completions;
        "dr_grpo": the sum over all tokens / (N * max_new_tokens) (max_new_tokens None: L);
        "dapo":    the sum over all tokens / the number of tokens in the mask.
    """
    raise NotImplementedError
