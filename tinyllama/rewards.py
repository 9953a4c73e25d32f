"""Rewards for reinforcement learning (GRPO): Python callables that score sampled completions.

A reward is any function

    f(prompts, completions, **columns) -> list of floats, one per completion

prompts: the conversations replied to (lists of {"role", "content"} messages), one per
completion (a prompt's G completions each get it); completions: the decoded replies, ending with
the `<|end|>` piece when the model ended its turn there (cut at grpo.max_new_tokens otherwise);
columns: the prompts' other fields, one value per completion: `answer` and `question` for the
built-in chat corpus (None where a conversation has none), `completion_ids` (the reply's token
ids, `<|end|>` included) for every source. A reward may return None for a completion it does not
apply to (it then counts 0).

Rewards are chosen in the config by import path, each with a weight and bound keyword arguments:

    grpo:
      rewards:
        - {_target_: tinyllama.rewards.exact_answer, weight: 1.0}
        - {_target_: tinyllama.rewards.answer_overlap, weight: 0.5}
        - {_target_: tinyllama.rewards.format_reward, weight: 0.2}
        - {_target_: my_rewards:length_bonus, weight: 0.1, kwargs: {target: 12}}

`load_rewards` imports them ("module:function" or "module.function") and `score` calls them,
checking what they return: a reward that raises, returns a list of the wrong length or a value
that is not a finite number is reported by name.
"""

from __future__ import annotations

import collections
import functools
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from tinyllama.chat_template import CHAT_PIECES, END_OF_TURN
from tinyllama.data.synthetic_chat import answer_matches
from tinyllama.errors import ConfigError

RewardFn = Callable[..., List[Optional[float]]]


def reply_text(completion: str) -> str:
    """The reply without the end-of-turn piece it may end with."""
    return completion.removesuffix(END_OF_TURN)


def exact_answer(prompts, completions, answer: Sequence[Optional[str]], **_) -> List[Optional[float]]:
    """1 where the reply is the expected short answer (synthetic_chat.answer_matches, the rule of
    answer_accuracy) and the turn was ended, else 0; None where the prompt has no answer."""
    return [
        None if a is None else float(c.endswith(END_OF_TURN) and answer_matches(reply_text(c), a))
        for c, a in zip(completions, answer)
    ]


def answer_overlap(prompts, completions, answer: Sequence[Optional[str]], **_) -> List[Optional[float]]:
    """Partial credit: the F1 of the reply's words against the answer's (1 for an exact answer,
    7/8 for a story's last sentence with one wrong name), so a long answer that is nearly right
    beats one that is far off; None where the prompt has no answer."""
    scores: List[Optional[float]] = []
    for c, a in zip(completions, answer):
        if a is None:
            scores.append(None)
            continue
        got, want = reply_text(c).split(), a.split()
        common = sum((collections.Counter(got) & collections.Counter(want)).values())
        scores.append(0.0 if common == 0 else 2 * common / (len(got) + len(want)))
    return scores


def format_reward(prompts, completions, **_) -> List[float]:
    """1 where the reply ends its turn with `<|end|>` and holds no other chat piece (no turn of
    another role begun inside it), else 0."""
    return [
        float(c.endswith(END_OF_TURN) and not any(p in reply_text(c) for p in CHAT_PIECES))
        for c in completions
    ]


def overlong_penalty(
    prompts, completions, completion_ids: Sequence[Sequence[int]], max_length: int, soft: int = 4, **_
) -> List[float]:
    """DAPO's soft over-length punishment: 0 up to max_length - soft tokens, then falling
    linearly to -1 at max_length (a completion cut there without ending its turn)."""
    start = max_length - soft
    return [-min(1.0, max(0, len(ids) - start) / max(soft, 1)) for ids in completion_ids]


@dataclass
class Reward:
    """A loaded reward: its name (the config's _target_), the function and its weight."""

    name: str
    fn: RewardFn
    weight: float


def import_target(target: str) -> Callable[..., Any]:
    """The callable named "package.module:function" or "package.module.function"."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"grpo.rewards: _target_={target!r} does not import ({type(e).__name__}: {e}): give "
            "'package.module:function' of a module on the Python path"
        ) from None
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: _target_={target!r} is not callable")
    return fn


def load_rewards(configs: Sequence[Any]) -> List[Reward]:
    """Rewards from the config's entries (tinyllama.config.RewardConfig)."""
    rewards = []
    for cfg in configs:
        fn = import_target(cfg._target_)
        if cfg.kwargs:
            fn = functools.partial(fn, **dict(cfg.kwargs))
        rewards.append(Reward(cfg._target_, fn, float(cfg.weight)))
    return rewards


def call_reward(
    reward: Reward, prompts: Sequence[Any], completions: Sequence[str], columns: Dict[str, Sequence[Any]]
) -> List[float]:
    """reward's scores of the completions, checked: one finite number (or None, counted 0) per
    completion, or a ConfigError that names the function."""
    try:
        values = reward.fn(list(prompts), list(completions), **columns)
    except Exception as e:  # a user's function: any failure is reported with its name
        raise ConfigError(f"reward {reward.name} raised {type(e).__name__}: {e}") from e
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(type(values).__name__)
        raise ConfigError(
            f"reward {reward.name} returned {got} for {len(completions)} completions: return a "
            "list with one float per completion"
        )
    scores = []
    for i, v in enumerate(values):
        if v is None:
            scores.append(0.0)
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise ConfigError(
                f"reward {reward.name} returned {v!r} for completion {i} ({completions[i]!r}): every "
                "value must be a finite number (or None where the reward does not apply)"
            )
        scores.append(x)
    return scores
