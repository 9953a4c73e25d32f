"""GRPO: the arithmetic against a hand computation, the rewards' checks, and GRPO runs through the
one training loop (logged figures, exact resume, refusals before anything is written)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllama.checkpoint import load_checkpoint
from tinyllama.config import RewardConfig, validate
from tinyllama.errors import ConfigError, DataError
from tinyllama.rewards import Reward, call_reward, exact_answer, format_reward, load_rewards, overlong_penalty
from tinyllama.train import loop
from tinyllama.train.grpo import PromptOrder, PromptSet, completion_logps, shared_prompt_batch
from tinyllama.train.grpo_loss import completion_mask, group_advantages, grpo_loss
from tinyllama.train.loop import Trainer, run_training

# ---- the arithmetic --------------------------------------------------------------------------


def test_advantages_compare_each_completion_with_its_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    mean, std = 0.25, math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased
    expected = [(r - mean) / (std + 1e-4) for r in (1.0, 0.0, 0.0, 0.0)] + [0.0] * 4
    assert group_advantages(rewards, 4, "group").tolist() == pytest.approx(expected)
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]
    )
    batch_std = rewards.std().item()
    assert group_advantages(rewards, 4, "batch")[0].item() == pytest.approx(0.75 / (batch_std + 1e-4))


def test_the_completion_mask_ends_with_the_first_end_of_turn():
    END = 9
    ids = torch.tensor([[5, 9, 9, 9], [5, 6, 7, 8], [9, 9, 9, 9]])
    assert completion_mask(ids, END).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def hand_loss(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len):
    """The GRPO loss written out token by token, in plain Python floats."""
    rows = []
    for i in range(len(logps)):
        row = []
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            d = ref[i][t] - logps[i][t]
            kl = math.exp(d) - d - 1
            row.append(-min(ratio * adv[i], clipped * adv[i]) + beta * kl)
        rows.append(row)
    if loss_type == "grpo":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if loss_type == "dr_grpo":
        return sum(sum(r) for r in rows) / (len(rows) * max_len)
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)  # dapo


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_grpo_loss_of_a_hand_built_group_equals_a_hand_computation(loss_type, beta):
    # One group of 3 completions of up to 4 tokens; ratios both inside and outside the clip range.
    logps = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, -3.0], [-2.5, -0.2, -0.9, -1.1]]
    old = [[-1.1, -0.5, -1.0, -0.1], [-0.6, -1.0, -0.7, -1.0], [-2.0, -0.9, -0.9, -1.3]]
    ref = [[-0.9, -0.7, -1.5, -0.4], [-0.5, -1.1, -0.2, -2.0], [-2.2, -0.4, -1.0, -1.0]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5]), 3).tolist()
    loss, stats = grpo_loss(
        torch.tensor(logps),
        torch.tensor(old),
        torch.tensor(adv),
        torch.tensor(mask, dtype=torch.float32),
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        max_new_tokens=6,
        beta=beta,
        ref_logps=torch.tensor(ref),
    )
    assert loss.item() == pytest.approx(
        hand_loss(logps, old, ref, adv, mask, 0.2, 0.28, beta, loss_type, 6), rel=1e-6
    )
    assert 0 < stats["clip_ratio"].item() < 1


def test_on_the_first_update_the_gradient_is_the_advantage_weighted_log_likelihood():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    mask = torch.ones(2, 2)
    loss, _ = grpo_loss(logps, logps.detach(), torch.tensor([1.0, -1.0]), mask, loss_type="dapo")
    loss.backward()
    assert logps.grad.tolist() == [[-0.25, -0.25], [0.25, 0.25]]  # -A / tokens


# ---- rewards ----------------------------------------------------------------------------------


def test_the_built_in_rewards():
    completions = ["Mia<|end|>", "Mia", "Tom<|end|>", "Mia<|user|>x<|end|>"]
    assert exact_answer(None, completions, answer=["Mia", "Mia", "Mia", None]) == [1.0, 0.0, 0.0, None]
    assert format_reward(None, completions) == [1.0, 0.0, 1.0, 0.0]
    ids = [[1] * n for n in (2, 13, 15, 16)]
    assert overlong_penalty(None, completions, ids, max_length=16, soft=4) == [0.0, -0.25, -0.75, -1.0]


def rewards_module(tmp_path, monkeypatch, source: str) -> str:
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards"


def test_a_reward_that_fails_or_misbehaves_is_named(tmp_path, monkeypatch):
    rewards_module(
        tmp_path,
        monkeypatch,
        "def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def fine(prompts, completions, scale=1.0, **kw):\n    return [scale * len(c) for c in completions]\n",
    )
    args = ([[]] * 2, ["a", "bb"], {})
    for name, match in [("boom", "raised KeyError"), ("short", "returned 1 values for 2"), ("nan", "nan")]:
        with pytest.raises(ConfigError, match=f"my_rewards:{name} .*{match}"):
            call_reward(
                Reward(f"my_rewards:{name}", load_rewards([RewardConfig(f"my_rewards:{name}")])[0].fn, 1),
                *args,
            )
    (fine,) = load_rewards([RewardConfig("my_rewards.fine", 0.5, {"scale": 2.0})])
    assert fine.weight == 0.5 and call_reward(fine, *args) == [2.0, 4.0]
    with pytest.raises(ConfigError, match="does not import"):
        load_rewards([RewardConfig("my_rewards:missing")])
    with pytest.raises(ConfigError, match="does not import"):
        load_rewards([RewardConfig("no_such_module.reward")])


def per_completion_logps(model, prompts, completions):
    """The plain way: each completion in a row of its own, [left padding][prompt][completion]."""
    out = []
    for ids, group in zip(prompts, completions):
        for completion in group.tolist():
            row = torch.tensor([ids + completion])
            logits = model(row).logits[0, len(ids) - 1 : -1]  # position t predicts token t + 1
            out.append(
                torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            )
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_shared_prompt_batch_gives_each_completion_its_own_rows_log_probs(attn, tiny_chat_model):
    # A large init spreads the logits, so that a token seeing the wrong keys shows.
    model = tiny_chat_model(97, 64, attn_implementation=attn, initializer_range=0.2)
    G, pad = 3, 0
    prompts = [[5, 6, 7, 8, 9], [11, 12]]  # unequal: the second is left-padded
    completions = [torch.randint(1, 97, (G, 4)), torch.randint(1, 97, (G, 2))]  # unequal widths
    masks = [torch.ones(G, 4, dtype=torch.long), torch.ones(G, 2, dtype=torch.long)]
    batch = shared_prompt_batch(prompts, completions, masks, pad)
    assert batch["input_ids"].shape == (2, 5 + G * 4) and batch["completion_mask"].shape == (2 * G, 4)
    assert batch["completion_mask"][G:, 2:].sum() == 0  # the second group's padding is masked
    assert int(batch["num_tokens"]) == 5 + 2 + 2 * G * 4

    shared = completion_logps(model, batch)  # (2G, 4)
    plain = per_completion_logps(model, prompts, completions)
    for n, expected in enumerate(plain):
        torch.testing.assert_close(shared[n, : len(expected)], expected, rtol=1e-5, atol=1e-5)

    # The gradients of a loss over the completion tokens are the same too.
    weights = torch.randn(2 * G, 4) * batch["completion_mask"]
    (shared * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(
        (lp * weights[n, : len(lp)]).sum()
        for n, lp in enumerate(per_completion_logps(model, prompts, completions))
    ).backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        # Summed in another order: float32 rounding of the whole tensor, not of each element.
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_prompt_weights_repeat_and_drop_prompts_in_each_epoch():
    weights = np.array([0.0, 1.0, 2.0, 0.5])
    counts = np.bincount(
        PromptOrder(4, seed=3, rank=0, world_size=1, weights=weights).take(4000), minlength=4
    )
    assert counts[0] == 0  # weight 0: never drawn
    # ~1300 epochs of [1, 2, 2] and a seeded coin for 3: the draws follow the weights.
    np.testing.assert_allclose(counts[1:] / counts[1], [1.0, 2.0, 0.5], atol=0.06)
    # Two ranks deal each epoch out between them: disjoint draws, together the epoch.
    dealt = [PromptOrder(40, seed=3, rank=r, world_size=2, weights=np.full(40, 2.0)).take(40) for r in (0, 1)]
    assert sorted(dealt[0] + dealt[1]) == sorted(list(range(40)) * 2)
    # A resume with other weights would draw other prompts: refused, by name.
    order = PromptOrder(4, seed=3, rank=0, world_size=1, weights=weights)
    order.take(7)
    saved = order.state_dict()
    other = PromptOrder(4, seed=3, rank=0, world_size=1, weights=np.array([1.0, 1.0, 2.0, 0.5]))
    with pytest.raises(DataError, match="saved grpo.prompt_weights differs"):
        other.load_state_dict(saved)
    resumed = PromptOrder(4, seed=3, rank=0, world_size=1, weights=weights.copy())
    resumed.load_state_dict(saved)
    assert resumed.take(20) == order.take(20)


def test_prompt_weights_name_values_the_prompts_have(chat_job, chat_tokenizer):
    job = copy.deepcopy(chat_job)
    job.train.seq_len = 512  # the 512-piece tokenizer's prompts are up to ~400 tokens
    job.grpo.prompt_weights = {"boy/girl": 3.0, "where": 0.0}
    prompts = PromptSet(job, chat_tokenizer)
    kinds = prompts.columns["question"]
    assert {w for k, w in zip(kinds, prompts.weights) if k == "boy/girl"} == {3.0}
    assert {w for k, w in zip(kinds, prompts.weights) if k not in ("boy/girl", "where")} == {1.0}
    job.grpo.prompt_weights = {"boy or girl": 2.0}
    with pytest.raises(
        DataError, match="no prompt has question 'boy or girl'; the values are animal, boy/girl"
    ):
        PromptSet(job, chat_tokenizer)
    job.grpo.prompt_weights, job.grpo.weight_column = {"boy/girl": 2.0}, "kind"
    with pytest.raises(DataError, match="its prompts have no column 'kind'"):
        PromptSet(job, chat_tokenizer)
    job.grpo.weight_column = "question"
    job.grpo.prompt_weights = {k: 0.0 for k in set(kinds)}
    with pytest.raises(DataError, match="every prompt has weight 0"):
        PromptSet(job, chat_tokenizer)


# ---- runs -------------------------------------------------------------------------------------

KINDS = ("who", "animal", "boy/girl", "ending", "friend", "where", "thing", "food")  # the built-in questions

# Random completions of a random model differ in their ids' sum, so groups carry signal.
ID_REWARD = "def id_sum(prompts, completions, completion_ids, **kw):\n    return [sum(i) % 5 / 4 for i in completion_ids]\n"


@pytest.fixture
def grpo_job(chat_job, chat_tokenizer, tmp_path, monkeypatch, base_run_of):
    """A 4-step GRPO run of chat_job's tiny random model with a context of 512 (the prompts with
    the 512-piece tokenizer are up to ~400 tokens): 2 prompts x 4 completions a step, rewarded by
    a function of their ids."""
    rewards_module(tmp_path, monkeypatch, ID_REWARD)
    job = copy.deepcopy(chat_job)
    job.model.max_position_embeddings = job.train.seq_len = 512
    job.init_from = str(base_run_of(tmp_path / "base512", job.model, chat_tokenizer))
    job.train.objective, job.train.max_steps, job.train.batch_size = "grpo", 4, 2
    job.checkpoint.every, job.eval.every = 2, 2
    job.grpo.num_generations, job.grpo.max_new_tokens = 4, 6
    job.grpo.rewards = [
        RewardConfig("my_rewards:id_sum"),
        RewardConfig("tinyllama.rewards.format_reward", 0.5),
    ]
    return job


def metrics(job):
    lines = (loop.run_dir_of(job) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_grpo_run_logs_rewards_kl_clipping_and_speeds(grpo_job):
    grpo_job.grpo.beta, grpo_job.grpo.num_iterations = 0.1, 2
    grpo_job.grpo.prompt_weights = {kind: 0.0 for kind in KINDS if kind != "who"}  # "who" only
    validate(grpo_job)
    run_training(grpo_job)
    lines = [m for m in metrics(grpo_job) if "loss" in m]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    rollout_keys = (
        "rewards/my_rewards:id_sum/mean",
        "rewards/my_rewards:id_sum/std",
        "rewards/tinyllama.rewards.format_reward/mean",
        "reward",
        "frac_reward_zero_std",
        "completions/mean_length",
        "rollout_tok_per_s",
    )
    # num_iterations=2: steps 1 and 3 sample, steps 2 and 4 update again on the same rollouts.
    for m in lines:
        if m["step"] in (1, 3):
            assert all(math.isfinite(m[k]) for k in rollout_keys)
        else:
            assert not any(k in m for k in rollout_keys)
        assert math.isfinite(m["kl"]) and math.isfinite(m["clip_ratio"])
    assert lines[0]["kl"] == 0.0 and lines[0]["clip_ratio"] == 0.0  # policy = reference = sampler
    assert lines[1]["kl"] > 0  # the second update of the same rollouts: the policy has moved
    assert all(m["update_tok_per_s"] > 0 for m in lines[1:])
    summary = json.loads((Path(grpo_job.run.dir) / "summary.json").read_text())
    assert summary["prompt_share_by_question"] == {"who": 1.0}
    assert set(summary["frac_reward_zero_std_by_question"]) == {"who"}


HALF_REWARD = (
    "def half(prompts, completions, completion_ids, answer, **kw):\n"
    "    return [1.0 if len(a) % 2 == 0 else sum(i) % 5 / 4 for a, i in zip(answer, completion_ids)]\n"
    "def same(prompts, completions, **kw):\n"
    "    return [1.0] * len(completions)\n"
)


def test_dynamic_sampling_updates_only_on_groups_whose_rewards_differ(grpo_job, tmp_path, monkeypatch):
    # Prompts whose answer has an even length get one reward for all their completions: no signal, dropped.
    rewards_module(tmp_path, monkeypatch, HALF_REWARD)
    grpo_job.grpo.rewards = [RewardConfig("my_rewards:half")]
    grpo_job.grpo.dynamic_sampling, grpo_job.grpo.max_sampling_rounds = True, 4
    from tinyllama.train import grpo

    seen = []  # the rewards of each batch the update sees, as groups of G
    real = grpo.group_advantages

    def spy(rewards, G, scale="group"):
        seen.append(rewards.view(-1, G))
        return real(rewards, G, scale)

    monkeypatch.setattr(grpo, "group_advantages", spy)
    run_training(grpo_job)
    assert len(seen) == 4
    assert all((groups.max(1).values > groups.min(1).values).all() for groups in seen)
    lines = [m for m in metrics(grpo_job) if "loss" in m]
    assert [m["groups_per_batch"] for m in lines] == [len(g) for g in seen]
    assert max(m["groups_per_batch"] for m in lines) == grpo_job.train.batch_size
    assert max(m["frac_reward_zero_std"] for m in lines) > 0  # the dropped groups are still counted

    # Rewards that never differ: each batch is one round's groups, a step that changes nothing.
    seen.clear()
    grpo_job.grpo.rewards = [RewardConfig("my_rewards:same")]
    grpo_job.run.dir = str(tmp_path / "same")
    run_training(grpo_job)
    assert [len(g) for g in seen] == [grpo_job.train.batch_size] * 4
    assert all(m["grad_norm"] == 0 for m in metrics(grpo_job) if "loss" in m)


def test_a_resumed_grpo_run_samples_and_steps_as_an_uninterrupted_one(grpo_job, tmp_path, monkeypatch):
    grpo_job.grpo.num_iterations = 2  # the stop falls between two updates of the same rollouts
    grpo_job.checkpoint.every = 1
    straight = copy.deepcopy(grpo_job)
    straight.run.dir = str(tmp_path / "straight")
    run_training(straight)
    real = Trainer.optimizer_step

    def stop_at_3(self, loss, grad_norm):
        real(self, loss, grad_norm)
        if self.step + 1 == 3:
            import signal

            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", stop_at_3)
        run_training(grpo_job)
    assert load_checkpoint(loop.run_dir_of(grpo_job)).step == 3
    run_training(grpo_job)
    keys = ("step", "loss", "grad_norm", "reward", "completions/mean_length")

    def figures(job):
        lines = [m for m in metrics(job) if "loss" in m]
        return {m["step"]: [m.get(k) for k in keys] for m in lines}

    assert all(f[2] > 0 for f in figures(straight).values())  # every step had a gradient
    assert figures(grpo_job) == figures(straight)  # the resumed launch rewrites steps 3 and 4


def test_grpo_refusals_come_before_anything_is_written(grpo_job, tmp_path, monkeypatch):
    grpo_job.grpo.num_generations = 1
    with pytest.raises(ConfigError, match="at least 2"):
        validate(grpo_job)
    grpo_job.grpo.num_generations = 4
    windowed = copy.deepcopy(grpo_job)
    windowed.model.sliding_window, windowed.model.max_window_layers = 64, 0
    with pytest.raises(ConfigError, match="model.sliding_window=64 .* set model.sliding_window=null"):
        validate(windowed)
    windowed = copy.deepcopy(grpo_job)
    windowed.grpo.prompt_weights = {"boy/girl": -1.0}
    with pytest.raises(ConfigError, match="each weight must be a number >= 0"):
        validate(windowed)
    grpo_job.grpo.rewards = [RewardConfig("my_rewards:nope")]
    with pytest.raises(ConfigError, match="does not import"):
        run_training(grpo_job)
    rewards_module(tmp_path, monkeypatch, "def bad(prompts, completions, **kw):\n    return None\n")
    grpo_job.grpo.rewards = [RewardConfig("my_rewards:bad")]
    with pytest.raises(ConfigError, match="my_rewards:bad returned"):
        run_training(grpo_job)
    grpo_job.grpo.rewards = [RewardConfig()]
    grpo_job.grpo.max_new_tokens = grpo_job.train.seq_len - 20  # no built-in prompt fits
    with pytest.raises(DataError, match="train conversation 0: its prompt is .* tokens"):
        run_training(grpo_job)
    assert not Path(grpo_job.run.dir).exists()
