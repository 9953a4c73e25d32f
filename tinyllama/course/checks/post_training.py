"""Lesson 10 check: the DPO loss against tinyllama/dpo.py (dpo_loss), and GRPO's advantages,
completion mask and clipped loss against tinyllama/train/grpo_loss.py, values and gradients."""

from __future__ import annotations

from types import ModuleType
from typing import Dict

import torch
import torch.nn.functional as F

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.dpo import dpo_loss
from tinyllama.train.grpo_loss import completion_mask, group_advantages, grpo_loss

END = 3  # the end-of-turn id of the made-up completions


def _pairs(seed: int, batch: int = 8, spread: float = 4.0) -> Dict[str, torch.Tensor]:
    """Summed log-probs of `batch` pairs under policy and reference, (B,) float32 each."""
    g = torch.Generator().manual_seed(seed)
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    logps = {n: -20 + spread * torch.randn(batch, generator=g) for n in names}
    logps["chosen_tokens"] = torch.randint(1, 12, (batch,), generator=g)
    logps["rejected_tokens"] = torch.randint(1, 12, (batch,), generator=g)
    return logps


def _case_dpo(learner: ModuleType, seed: int, beta: float, loss_type: str, smoothing: float, spread: float):
    inputs = _pairs(seed, spread=spread)
    mine = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in inputs.items()}
    ref = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in inputs.items()}
    got = learner_attr(learner, "dpo_loss")(**mine, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    expected = dpo_loss(**ref, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    if not isinstance(got, tuple) or len(got) != 3:
        raise Mismatch(
            f"dpo_loss returned {type(got).__name__}: return (losses, chosen_rewards, rejected_rewards)"
        )
    chosen = inputs["policy_chosen_logps"] - inputs["ref_chosen_logps"]
    rejected = inputs["policy_rejected_logps"] - inputs["ref_rejected_logps"]
    margin = chosen - rejected
    mistakes = {}
    if loss_type == "sigmoid":
        mistakes = {
            "the reference is left out: the log-ratio is policy minus reference log-probs": -F.logsigmoid(
                beta * (inputs["policy_chosen_logps"] - inputs["policy_rejected_logps"])
            ),
            "beta is missing: z = beta x (chosen log-ratio - rejected log-ratio)": -F.logsigmoid(margin),
            "chosen and rejected are swapped: the loss falls as chosen's log-ratio rises": -F.logsigmoid(
                -beta * margin
            ),
            "label_smoothing weighs the wrong term: (1 - ls) goes with log sigmoid(z), ls with log sigmoid(-z)": (
                -smoothing * F.logsigmoid(beta * margin) - (1 - smoothing) * F.logsigmoid(-beta * margin)
            ),
        }
    else:
        mistakes = {
            "the log-ratios are not averaged per token: divide each by its reply's token count": (
                (margin - 1 / (2 * beta)) ** 2
            ),
            "the target is 1 / (2 beta), not beta / 2 or 1 / beta": (
                chosen / inputs["chosen_tokens"] - rejected / inputs["rejected_tokens"] - 1 / beta
            )
            ** 2,
        }
    what = f"dpo_loss losses ({loss_type}, beta={beta}, label_smoothing={smoothing})"
    if (
        isinstance(got[0], torch.Tensor)
        and not torch.isfinite(got[0]).all()
        and torch.isfinite(expected[0]).all()
    ):
        raise Mismatch(
            f"{what} has inf/NaN for margins of {margin.abs().max().item():.0f} nats: log(sigmoid(z)) "
            "underflows to log(0); use F.logsigmoid(z)"
        )
    compare(got[0], expected[0].detach(), what=what, dims=("B",), mistakes=mistakes)
    for name, g, e in (("chosen_rewards", got[1], expected[1]), ("rejected_rewards", got[2], expected[2])):
        compare(
            g,
            e,
            what=f"dpo_loss {name}",
            dims=("B",),
            mistakes={"a reward is beta x the log-ratio, not the log-ratio alone": e / beta}
            if beta != 1
            else {},
        )
        if isinstance(g, torch.Tensor) and g.requires_grad:
            raise Mismatch(f"{name} carries a gradient: detach it (a figure to log, not part of the loss)")
    got[0].sum().backward()
    expected[0].sum().backward()
    for name in ("policy_chosen_logps", "policy_rejected_logps"):
        if mine[name].grad is None:
            raise Mismatch(f"no gradient reaches {name}: build the loss from it with torch operations")
        compare(
            mine[name].grad, ref[name].grad, what=f"the gradient of the losses' sum by {name}", dims=("B",)
        )


def _case_advantages(learner: ModuleType, scale: str) -> None:
    g = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 3, (4, 6), generator=g).float()
    rewards[1] = 1.0  # a group whose rewards are all equal: its std is 0
    rewards = rewards.flatten()
    got = learner_attr(learner, "group_advantages")(rewards.clone(), 6, scale)
    expected = group_advantages(rewards, 6, scale)
    grouped = rewards.view(-1, 6)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    std = {"group": grouped.std(1).repeat_interleave(6), "batch": rewards.std(), "none": None}[scale]
    mistakes = {
        "the batch's mean is subtracted: each completion is compared with its own group's mean": (
            (rewards - rewards.mean()) if std is None else (rewards - rewards.mean()) / (std + 1e-4)
        ),
    }
    if scale == "group":
        biased = grouped.std(1, unbiased=False).repeat_interleave(6)
        mistakes["the std is the biased one (divides by G): use torch's default .std()"] = centred / (
            biased + 1e-4
        )
        mistakes["the std is the batch's: with scale='group' each group's own std"] = centred / (
            rewards.std() + 1e-4
        )
    elif scale == "batch":
        mistakes["the std is each group's: with scale='batch' the whole batch's"] = centred / (
            grouped.std(1).repeat_interleave(6) + 1e-4
        )
    else:
        mistakes["scale='none' divides by nothing"] = expected / (rewards.std() + 1e-4)
    if isinstance(got, torch.Tensor) and scale == "group" and torch.isnan(got[6:12]).any():
        raise Mismatch(
            "group_advantages gives NaN for a group whose rewards are all equal (0 / 0): add 1e-4 to "
            "the std; such a group's advantages are 0"
        )
    compare(got, expected, what=f"group_advantages (scale={scale!r})", dims=("N",), mistakes=mistakes)


def _case_mask(learner: ModuleType) -> None:
    ids = torch.tensor(
        [
            [5, 6, END, 0, 0],  # ends, then padding
            [5, 6, 7, 8, 9],  # never ends: every token counts
            [END, END, END, END, END],  # ends at once; the ends after it are not written by the model
            [5, END, 6, END, 7],  # sampled past its end: only the first end counts
        ]
    )
    got = learner_attr(learner, "completion_mask")(ids.clone(), END)
    expected = completion_mask(ids, END)
    ends = (ids == END).long()
    mistakes = {
        f"the first {END} (the end-of-turn) is left out: it is written by the model, so it is learnt": (
            ends.cumsum(1) == 0
        ).float(),
        "tokens up to a later end still count: only the tokens up to the first end do": (
            (torch.flip(torch.flip(ends, [1]).cumsum(1), [1]) > 0) | (ends.sum(1, keepdim=True) == 0)
        ).float(),
        f"the mask drops the {END}s and keeps what follows: cover the tokens up to and including the first end": (
            ids != END
        ).float(),
    }
    compare(got, expected, what="completion_mask", dims=("N", "L"), atol=0, rtol=0, mistakes=mistakes)


def _rollout(seed: int):
    g = torch.Generator().manual_seed(seed)
    N, L = 6, 5
    logps = -2 * torch.rand(N, L, generator=g)
    old = logps + 0.4 * torch.randn(N, L, generator=g)  # ratios inside and outside the clip range
    ref = logps + 0.3 * torch.randn(N, L, generator=g)
    rewards = torch.randint(0, 2, (N,), generator=g).float()
    rewards[:3] = torch.tensor([1.0, 0.0, 0.0])
    advantages = group_advantages(rewards, 3)
    mask = torch.ones(N, L)
    for i, n in enumerate([5, 3, 1, 4, 2, 5]):
        mask[i, n:] = 0
    return logps, old, ref, advantages, mask


def _case_grpo(learner: ModuleType, seed: int, loss_type: str, beta: float, epsilon_high) -> None:
    logps, old, ref, advantages, mask = _rollout(seed)
    mine, theirs = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    kwargs = dict(
        epsilon=0.2,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_new_tokens=8,
        beta=beta,
        ref_logps=ref,
    )
    got = learner_attr(learner, "grpo_loss")(mine, old.clone(), advantages.clone(), mask.clone(), **kwargs)
    if isinstance(got, tuple):
        got = got[0]
    expected, _ = grpo_loss(theirs, old, advantages, mask, **kwargs)

    def variant(mask=mask, **change):  # the reference with one thing changed: a typical slip
        return grpo_loss(logps, old, advantages, mask, **dict(kwargs, **change))[0].detach()

    high = 0.2 if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old)
    A = advantages[:, None]
    unclipped = -ratio * A
    pessimistic_max = -torch.max(ratio * A, torch.clamp(ratio, 0.8, 1 + high) * A)
    mistakes = {
        "every token counts: multiply by the mask so padding after <|end|> adds nothing": variant(
            mask=torch.ones_like(mask)
        ),
        "the ratio is not clipped: -min(ratio * A, clamp(ratio, 1 - eps, 1 + eps_high) * A)": _reduce(
            unclipped, mask, loss_type, 8
        )
        + (0 if beta == 0 else _kl_term(logps, ref, mask, loss_type, beta)),
        "max instead of min: PPO takes the pessimistic (smaller) of the clipped and unclipped objectives": _reduce(
            pessimistic_max, mask, loss_type, 8
        )
        + (0 if beta == 0 else _kl_term(logps, ref, mask, loss_type, beta)),
    }
    if epsilon_high is not None:
        mistakes["epsilon_high is ignored: the upper clip is 1 + epsilon_high"] = variant(epsilon_high=None)
    if beta > 0:
        mistakes["the KL term is missing: add beta x (exp(ref - logp) - (ref - logp) - 1)"] = variant(
            beta=0.0
        )
    for other in ("grpo", "dr_grpo", "dapo"):
        if other != loss_type:
            mistakes[f"that is the {other!r} aggregation, not {loss_type!r}"] = variant(loss_type=other)
    what = f"grpo_loss ({loss_type}, beta={beta}, epsilon_high={epsilon_high})"
    compare(got, expected.detach(), what=what, dims=(), mistakes=mistakes)
    got.backward()
    expected.backward()
    if mine.grad is None:
        raise Mismatch("no gradient reaches logps: build the loss from logps with torch operations")
    compare(mine.grad, theirs.grad, what=f"the gradient of {what} by logps", dims=("N", "L"))


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    return (per_token * mask).sum() / mask.sum()


def _kl_term(logps, ref, mask, loss_type, beta) -> torch.Tensor:
    delta = ref - logps
    return _reduce(beta * (torch.exp(delta) - delta - 1), mask, loss_type, 8)


def check(grader: Grader, learner: ModuleType) -> None:
    for seed, beta, loss_type, smoothing, spread in (
        (0, 0.1, "sigmoid", 0.0, 4.0),
        (1, 0.5, "sigmoid", 0.0, 4.0),
        (2, 0.1, "sigmoid", 0.2, 4.0),
        (3, 1.0, "sigmoid", 0.0, 400.0),  # margins of hundreds of nats
        (4, 0.1, "ipo", 0.0, 4.0),
    ):
        grader.case(
            f"dpo_loss: {loss_type}, beta {beta}, label_smoothing {smoothing}, margins ~{spread:.0f} nats",
            lambda a=(seed, beta, loss_type, smoothing, spread): _case_dpo(learner, *a),
        )
    for scale in ("group", "batch", "none"):
        grader.case(
            f"group_advantages: scale={scale!r}", lambda scale=scale: _case_advantages(learner, scale)
        )
    grader.case("completion_mask: ends, never ends, ends at once, ends twice", lambda: _case_mask(learner))
    for seed, loss_type, beta, epsilon_high in (
        (0, "grpo", 0.0, None),
        (1, "dr_grpo", 0.0, None),
        (2, "dapo", 0.0, 0.28),
        (3, "dapo", 0.04, None),
        (4, "grpo", 0.04, 0.28),
    ):
        grader.case(
            f"grpo_loss: {loss_type}, beta {beta}, epsilon_high {epsilon_high}",
            lambda a=(seed, loss_type, beta, epsilon_high): _case_grpo(learner, *a),
        )
