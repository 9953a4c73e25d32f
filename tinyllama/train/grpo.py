"""GRPO, the objective: sample G completions per prompt, score them, and push the policy towards
the ones that did better than their group (tinyllama/train/grpo_loss.py holds the arithmetic).

One micro-batch (`next_batch`) is a rollout: train.batch_size prompts of this rank in one
left-padded batch, each prefilled once and continued G = grpo.num_generations times by
`generate` with the KV cache (on a CPU its decoding steps run through fast_decode's compiled
packed-weight step) at grpo.temperature / grpo.top_p, each completion stopped at `<|end|>` and
masked after it. The rewards (tinyllama/rewards.py) score the decoded completions; their weighted sum
gives the group-relative advantages. With grpo.dynamic_sampling (DAPO) the groups whose rewards
are all equal are dropped and more prompts are sampled to fill the batch with groups that carry
a signal. The update scores the completions in `shared_prompt_batch`'s layout: each prompt once
in a row with its G completions behind a block mask. With grpo.num_iterations > 1 the same rollouts serve that many
optimizer steps (the clipped ratio to the sampling policy then matters); with grpo.beta > 0 the
starting model gives the reference log-probs of the KL term (a frozen copy, or a LoRA policy's
base with its adapters switched off).

Prompts are the conversations of data's train split up to their last assistant turn (with
grpo.only_answered, on a corpus that has checkable answers, those whose last turn has one);
ranks are dealt disjoint prompts from a seeded order per epoch, in which grpo.prompt_weights can
repeat or leave out kinds of prompts (by the value of a column, such as the question kind). Each
rollout samples with a seed derived from run.seed, the rank and the number of rollouts so far, so
a resumed run samples what an uninterrupted one does; the rollouts not yet fully used are saved
with the state.
"""

from __future__ import annotations

import collections
import hashlib
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from tinyllama.chat_template import apply_chat_template, end_of_turn_id, require_chat_pieces
from tinyllama.config import JobConfig
from tinyllama.data.conversations import iter_conversations
from tinyllama.errors import DataError
from tinyllama.generate import generate
from tinyllama.rewards import call_reward, load_rewards
from tinyllama.train.distributed import DistEnv
from tinyllama.train.grpo_loss import completion_mask, group_advantages, grpo_loss
from tinyllama.train.objectives import Objective, reference_model


def shared_prompt_batch(
    prompts: List[List[int]], completions: List[torch.Tensor], masks: List[torch.Tensor], pad_id: int
) -> Dict[str, torch.Tensor]:
    """The update's batch: one row per prompt, the prompt once and its G completions after it.

    prompts: B lists of token ids; completions and masks: B tensors (G, W_b) of the sampled ids
    and their completion masks. Row b is [left padding][prompt b][completion 1]...[completion G],
    each completion right-padded to L = max W_b, so S = T + G * L columns with T the longest
    prompt. The boolean attention mask lets each completion see the prompt and its own earlier
    tokens, never another completion; its positions continue from the prompt's end. So every
    completion token gets the logits it would get in a row of its own, [prompt][completion],
    while the prompt, most of the tokens, goes through the model once instead of G times.

    Returns input_ids (B, S), attention_mask (B, 1, S, S) bool, position_ids (B, S),
    completion_mask (B * G, L) in the order of the completions, and num_tokens, the columns the
    forward computes less the prompts' left padding (for update tokens/s).
    """
    B, G = len(prompts), completions[0].shape[0]
    T, L = max(len(p) for p in prompts), max(c.shape[1] for c in completions)
    S = T + G * L
    input_ids = torch.full((B, G, L), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(B, G, L, dtype=masks[0].dtype)
    prompt_ids = torch.full((B, T), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts])
    for b, (ids, completion, mask) in enumerate(zip(prompts, completions, masks)):
        prompt_ids[b, T - len(ids) :] = torch.tensor(ids)
        input_ids[b, :, : completion.shape[1]] = completion
        completion_mask[b, :, : mask.shape[1]] = mask
    input_ids = torch.cat([prompt_ids, input_ids.view(B, G * L)], 1)  # (B, S)

    column = torch.arange(S)
    block = torch.where(column < T, -1, (column - T) // L)  # -1: the prompt, g: completion g
    padding = column[None] < (T - lengths)[:, None]  # (B, S) the left padding
    sees = (column[None] <= column[:, None]) & ((block[None] == -1) | (block[None] == block[:, None]))
    attention_mask = sees[None] & ~padding[:, None, :]  # (B, S, S): query, key
    attention_mask |= torch.eye(S, dtype=torch.bool)[None] & padding[:, :, None]  # no empty row
    # A prompt's tokens sit at 0 .. P - 1, every completion's at P, P + 1, ... (padding at 0).
    offset = torch.where(block == -1, column - T, (column - T) % L)  # (S,)
    position_ids = (offset[None] + lengths[:, None]).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask[:, None],
        "position_ids": position_ids,
        "completion_mask": completion_mask.view(B * G, L),
        "num_tokens": lengths.sum() + B * G * L,
    }


def completion_logps(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities (N, L) that `model` gives the completion tokens of a `shared_prompt_batch`.

    The first token of every completion is predicted from the prompt's last column, token j > 0
    of completion g from the column before it in g's block: the logits of the last G * L + 1
    columns, with the first one read G times."""
    input_ids = batch["input_ids"]
    B, S = input_ids.shape
    N, L = batch["completion_mask"].shape
    G = N // B
    logits = model(
        input_ids,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=G * L + 1,
    ).logits  # (B, G * L + 1, V): column T - 1 onward
    rows = torch.arange(G * L, device=input_ids.device).view(G, L)
    rows[:, 0] = 0  # every completion's first token: the prompt's last column
    logits = logits[:, rows.flatten()]  # (B, G * L, V): row g * L + j predicts token j of completion g
    logps = torch.log_softmax(logits.float(), dim=-1)
    return logps.gather(-1, input_ids[:, -G * L :, None])[..., 0].reshape(N, L)


class PromptSet:
    """The prompts GRPO samples from: token ids ending with `<|assistant|>`, their messages and
    their other columns; checked to leave grpo.max_new_tokens in train.seq_len."""

    def __init__(self, job: JobConfig, tokenizer) -> None:
        conversations = list(enumerate(iter_conversations(job.data, "train")))  # (row, record)
        if job.grpo.only_answered and any(c.get("answer") is not None for _, c in conversations):
            conversations = [(row, c) for row, c in conversations if c.get("answer") is not None]
        budget = job.train.seq_len - job.grpo.max_new_tokens
        self.messages, self.ids, self.columns = [], [], collections.defaultdict(list)
        for row, c in conversations:
            last = max(i for i, m in enumerate(c["messages"]) if m["role"] == "assistant")
            messages = c["messages"][:last]
            ids = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
            if len(ids) > budget:
                raise DataError(
                    f"data={job.data.name} train conversation {row}: its prompt is {len(ids)} tokens, "
                    f"and with grpo.max_new_tokens={job.grpo.max_new_tokens} it exceeds "
                    f"train.seq_len={job.train.seq_len}: shorten or remove it, lower "
                    "grpo.max_new_tokens or raise train.seq_len"
                )
            self.messages.append(messages)
            self.ids.append(ids)
            for key, value in c.items():
                if key != "messages":
                    self.columns[key].append(value)
        if not self.ids:
            raise DataError(f"data={job.data.name} has no train conversation to take prompts from")
        self.weights = self._weights(job)

    def _weights(self, job: JobConfig) -> Optional[np.ndarray]:
        """Each prompt's grpo.prompt_weights (1 where its value is not named); None: all 1."""
        weights, column = dict(job.grpo.prompt_weights), job.grpo.weight_column
        if not weights:
            return None
        where = f"grpo.prompt_weights={weights} (grpo.weight_column={column}) on data={job.data.name}"
        if column not in self.columns:
            have = ", ".join(sorted(self.columns)) or "none"
            raise DataError(f"{where}: its prompts have no column {column!r} (columns: {have})")
        values = [str(v) for v in self.columns[column]]
        unknown = sorted(set(weights) - set(values))
        if unknown:
            raise DataError(
                f"{where}: no prompt has {column} {', '.join(map(repr, unknown))}; "
                f"the values are {', '.join(sorted(set(values)))}"
            )
        out = np.array([float(weights.get(v, 1.0)) for v in values])
        if out.sum() == 0:
            raise DataError(f"{where}: every prompt has weight 0; give some a weight > 0")
        return out

    def __len__(self) -> int:
        return len(self.ids)


class PromptOrder:
    """A seeded shuffle of the prompts per epoch, dealt round-robin to ranks; resumable.

    With weights, prompt i appears floor(w_i) times an epoch, and once more with probability
    w_i - floor(w_i), drawn from the epoch's seed: w_i times an epoch on average."""

    def __init__(
        self, count: int, seed: int, rank: int, world_size: int, weights: Optional[np.ndarray] = None
    ) -> None:
        expected = count if weights is None else float(weights.sum())
        if expected < world_size:
            raise DataError(
                f"{expected:g} prompts an epoch cannot be dealt to {world_size} ranks: give more prompts"
            )
        self.count, self.seed, self.rank, self.world_size = count, seed, rank, world_size
        self.weights = weights
        # What a resume must find the same: the weights, as a short fingerprint.
        self.mixture = "" if weights is None else hashlib.sha1(weights.tobytes()).hexdigest()[:16]
        self.epoch, self.taken = 0, 0

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is None:
            order = rng.permutation(self.count)
        else:
            whole = np.floor(self.weights)
            copies = whole + (rng.random(self.count) < self.weights - whole)
            order = rng.permutation(np.repeat(np.arange(self.count), copies.astype(np.int64)))
        return order[: len(order) // self.world_size * self.world_size][self.rank :: self.world_size]

    def take(self, n: int) -> List[int]:
        out, order = [], self._order()
        while len(out) < n:
            if self.taken == len(order):  # the epoch is used up (or, with small weights, empty)
                self.epoch, self.taken = self.epoch + 1, 0
                order = self._order()
                continue
            out.append(int(order[self.taken]))
            self.taken += 1
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "taken": self.taken,
            "seed": self.seed,
            "world_size": self.world_size,
            "mixture": self.mixture,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        names = {"seed": "run.seed", "world_size": "world size", "mixture": "grpo.prompt_weights"}
        for key, name in names.items():
            if state.get(key, "") != getattr(self, key):
                raise DataError(
                    f"cannot resume the GRPO prompts exactly: the saved {name} differs from this "
                    f"run's ({state.get(key, '')!r} against {getattr(self, key)!r}); use the same "
                    f"{name} to resume"
                )
        self.epoch, self.taken = state["epoch"], state["taken"]


class GRPOObjective(Objective):
    """train.objective=grpo (see the module docstring)."""

    def __init__(
        self,
        job: JobConfig,
        env: DistEnv,
        model: nn.Module,
        tokenizer,
        autocast: Callable[[], ContextManager],
    ) -> None:
        require_chat_pieces(tokenizer)
        self.job, self.cfg, self.env, self.model, self.tokenizer = job, job.grpo, env, model, tokenizer
        self.autocast = autocast
        self.end_id = end_of_turn_id(tokenizer)
        self.pad_id = tokenizer.eos_id
        self.rewards = load_rewards(self.cfg.rewards)
        self.prompts = PromptSet(job, tokenizer)
        self.order = PromptOrder(
            len(self.prompts), job.run.seed, env.rank, env.world_size, self.prompts.weights
        )
        self._probe_rewards()
        self.reference = reference_model(model) if self.cfg.beta > 0 else None
        self.rollouts = 0  # rollout batches sampled so far on this rank
        self.cached: List[Dict[str, Any]] = []  # rollouts still to be reused (num_iterations > 1)
        self.uses = 0  # updates made with the oldest cached rollouts
        self._window: Dict[str, List[float]] = collections.defaultdict(list)
        self._zero_std = collections.Counter()  # question kind -> groups whose rewards were all equal
        self._groups = collections.Counter()
        self._ready: Optional[float] = None  # when the last batch was handed to the loop

    def _probe_rewards(self) -> None:
        """Call every reward once on two made-up completions of the first prompt, so that one that
        does not run, or returns the wrong shape, stops the run before any step."""
        completions = ["", "<|end|>"]
        columns = {k: [v[0]] * 2 for k, v in self.prompts.columns.items()}
        columns["completion_ids"] = [[], [self.end_id]]
        for reward in self.rewards:
            call_reward(reward, [self.prompts.messages[0]] * 2, completions, columns)

    # ---- rollouts -------------------------------------------------------------------------
    @torch.no_grad()
    def _rollout(self) -> Dict[str, Any]:
        """Sample, score and prepare one rollout batch of train.batch_size prompts x G (with
        grpo.dynamic_sampling, up to that many groups whose rewards differ)."""
        cfg, G, device, want = self.cfg, self.cfg.num_generations, self.env.device, self.job.train.batch_size
        groups: List[Dict[str, Any]] = []  # prompt index, completions (G, L), their mask, rewards (G,)
        for _ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            round_groups = self._sample(self.order.take(want))
            if cfg.dynamic_sampling:
                round_groups = [g for g in round_groups if g["rewards"].max() > g["rewards"].min()]
            groups += round_groups
            if len(groups) >= want:
                break
        if not groups:  # no group disagreed in any round: an update that changes nothing
            groups = round_groups if round_groups else self._sample(self.order.take(want))
        groups = groups[:want]
        self._note("groups_per_batch", len(groups))

        layout = shared_prompt_batch(
            [self.prompts.ids[g["prompt"]] for g in groups],
            [g["completion"] for g in groups],
            [g["mask"] for g in groups],
            self.pad_id,
        )
        batch = {k: v.to(device) for k, v in layout.items()}
        rewards = torch.cat([g["rewards"] for g in groups])
        batch["advantages"] = group_advantages(rewards, G, cfg.scale_rewards).to(device)
        if cfg.num_iterations > 1:  # the sampling policy's log-probs, for the ratio of later updates
            batch["old_logps"] = self._logps(self.model, batch)
        if self.reference is not None:
            batch["ref_logps"] = self._logps(self.reference, batch)
        return batch

    def _sample(self, prompts: List[int]) -> List[Dict[str, Any]]:
        """G completions of each prompt in one left-padded batch, scored: one dict per prompt."""
        cfg, G = self.cfg, self.cfg.num_generations
        T = max(len(self.prompts.ids[i]) for i in prompts)
        prompt_ids = torch.full((len(prompts), T), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for r, i in enumerate(prompts):
            ids = self.prompts.ids[i]
            prompt_ids[r, T - len(ids) :] = torch.tensor(ids)
            prompt_mask[r, T - len(ids) :] = 1
        seed = int(
            np.random.SeedSequence([self.job.run.seed, self.env.rank, self.rollouts]).generate_state(1)[0]
        )
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        out = generate(
            self.model,
            prompt_ids.to(self.env.device),
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=None,
            top_p=cfg.top_p,
            eos_token_id=self.end_id,
            seed=seed,
            attention_mask=prompt_mask.to(self.env.device),
            num_return_sequences=G,  # one prefill per prompt
        )
        rollout_s = time.perf_counter() - start
        self.model.train(was_training)
        self.rollouts += 1
        completion = out[:, T:].cpu()
        mask = completion_mask(completion, self.end_id)  # (N, L)
        rewards = self._score([i for i in prompts for _ in range(G)], completion, mask)
        self._note("completions/mean_length", mask.sum(1).float().mean().item())
        self._note("completions/terminated_share", (completion == self.end_id).any(1).float().mean().item())
        self._note("rollout_tok_per_s", mask.sum().item() / max(rollout_s, 1e-9))
        return [
            {
                "prompt": i,
                "completion": completion[r * G : (r + 1) * G],
                "mask": mask[r * G : (r + 1) * G],
                "rewards": rewards[r * G : (r + 1) * G],
            }
            for r, i in enumerate(prompts)
        ]

    def _score(self, rows: List[int], completion: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the rewards of each completion, (N,) float32; logs each reward's
        mean and std and the groups whose rewards are all equal (per question kind, if given)."""
        ids = [row[: int(n)] for row, n in zip(completion.tolist(), mask.sum(1).tolist())]
        completions = [self.tokenizer.decode(x) for x in ids]
        prompts = [self.prompts.messages[i] for i in rows]
        columns = {k: [v[i] for i in rows] for k, v in self.prompts.columns.items()}
        columns["completion_ids"] = ids
        total = torch.zeros(len(rows))
        for reward in self.rewards:
            scores = torch.tensor(call_reward(reward, prompts, completions, columns))
            total += reward.weight * scores
            self._note(f"rewards/{reward.name}/mean", scores.mean().item())
            self._note(f"rewards/{reward.name}/std", scores.std().item())
        grouped = total.view(-1, self.cfg.num_generations)
        zero_std = (grouped.max(1).values == grouped.min(1).values).tolist()
        kinds = columns.get("question", [None] * len(rows))[:: self.cfg.num_generations]
        for kind, flat in zip(kinds, zero_std):
            self._groups[kind or "all"] += 1
            self._zero_std[kind or "all"] += flat
        self._note("reward", total.mean().item())
        self._note("reward_std", total.std().item())
        self._note("frac_reward_zero_std", float(np.mean(zero_std)))
        return total

    def _logps(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probabilities (N, L) that `model` gives the sampled completion tokens."""
        with self.autocast():
            return completion_logps(model, batch)

    # ---- the Objective interface -----------------------------------------------------------
    def next_batch(self) -> Dict[str, Any]:
        if self._ready is not None:  # the loop spent the time since on the update of the last batch
            tokens = self._last_tokens / max(time.perf_counter() - self._ready, 1e-9)
            self._note("update_tok_per_s", tokens)
        accum = self.job.train.grad_accum
        if not self.cached or self.uses == self.cfg.num_iterations * accum:
            self.cached = [self._rollout() for _ in range(accum)]
            self.uses = 0
        batch = self.cached[self.uses % accum]
        self.uses += 1
        self._last_tokens = int(batch["num_tokens"])
        self._ready = time.perf_counter()
        return batch

    def loss(self, model: nn.Module, batch: Dict[str, Any]) -> torch.Tensor:
        logps = self._logps(model, batch)
        cfg = self.cfg
        loss, stats = grpo_loss(
            logps,
            batch.get("old_logps", logps.detach()),
            batch["advantages"],
            batch["completion_mask"],
            cfg.epsilon,
            cfg.epsilon_high,
            cfg.loss_type,
            cfg.max_new_tokens,
            cfg.beta,
            batch.get("ref_logps"),
        )
        self._note("clip_ratio", stats["clip_ratio"].item())
        if cfg.beta > 0:
            self._note("kl", stats["kl"].item())
        return loss

    def _note(self, key: str, value: float) -> None:
        self._window[key].append(value)

    def window(self) -> Dict[str, float]:
        figures = {k: float(np.mean(v)) for k, v in self._window.items()}
        self._window.clear()
        return figures

    def total(self) -> Dict[str, Any]:
        """The share of groups whose rewards were all equal, per question kind ("all" where the
        prompts have none): the groups that gave no signal; and the share of the sampled groups
        per kind (what grpo.prompt_weights changes)."""
        zero = {k: self._zero_std[k] / n for k, n in sorted(self._groups.items())}
        drawn = {k: n / sum(self._groups.values()) for k, n in sorted(self._groups.items())}
        return {"frac_reward_zero_std_by_question": zero, "prompt_share_by_question": drawn}

    def state_dict(self) -> Dict[str, Any]:
        cached = [{k: v.cpu() for k, v in b.items()} for b in self.cached]
        return {
            "prompts": self.order.state_dict(),
            "rollouts": self.rollouts,
            "cached": cached,
            "uses": self.uses,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.order.load_state_dict(state["prompts"])
        self.rollouts, self.uses = int(state["rollouts"]), int(state["uses"])
        self.cached = [{k: v.to(self.env.device) for k, v in b.items()} for b in state["cached"]]
