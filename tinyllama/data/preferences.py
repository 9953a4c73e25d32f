"""Preference pairs for DPO, from your files, a Hugging Face dataset or the built-in chat corpus.

Every record becomes `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`
(messages as in tinyllama.chat_template; the replies are the assistant's turns), plus any other
columns of the record as they are (an optional "system" string becomes the prompt's first
message). Accepted shapes, TRL's and minimind's:

    conversational   {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                      "rejected": [...]}
    implicit prompt  {"chosen": [user, assistant, ...], "rejected": [user, assistant, ...]}: whole
                     conversations; their longest common run of messages is the prompt (TRL's
                     extract_prompt; minimind's DPO files have this shape)
    standard         {"prompt": "...", "chosen": "...", "rejected": "..."}: the prompt becomes a
                     user message, each reply an assistant message

Files: .jsonl, .json (a list of records) or .parquet, read as conversations are
(tinyllama.data.conversations); a Hugging Face dataset: dpo.hf_path (data.hf_name, its
data.hf_train_split / data.hf_val_split). Without a validation part, data.val_fraction of the
train pairs is held out, as for documents. With neither files nor dataset and data=synthetic_chat,
the built-in pairs (`builtin_pairs`): each short-answer question of the chat corpus, its right
answer chosen and a plausible wrong one from the same story rejected.

Bad input gets one DataError naming the file and row: a missing field, an empty reply, a reply
without an assistant turn, chosen equal to rejected, a malformed message (and, when the pairs
are encoded, one that does not fit train.seq_len: tinyllama.dpo.encode_pairs).
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Tuple

from tinyllama.chat_template import Message, check_message
from tinyllama.data import sources, synthetic_chat
from tinyllama.data.conversations import _records
from tinyllama.data.synthetic import ANIMALS, FOODS, PLACES, THINGS, generate_story_with_facts
from tinyllama.errors import DataError

if TYPE_CHECKING:
    from tinyllama.config import DataConfig, DPOConfig

Pair = Dict[str, Any]
"""{"prompt": [messages], "chosen": [messages], "rejected": [messages], ...other columns}."""

REPLIES = ("chosen", "rejected")
_FIX = (
    "give each record 'prompt', 'chosen' and 'rejected' (strings, or lists of {role, content} "
    "messages), or 'chosen' and 'rejected' conversations that share their prompt"
)

_SAME = (
    "{}: chosen and rejected are the same reply, so there is no preference to learn: fix or remove the record"
)


def to_pair(record: Any, where: str) -> Pair:
    """One record of any accepted shape -> a checked Pair; `where` names it in errors ("f.jsonl:3")."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}: {_FIX}")
    missing = [k for k in REPLIES if record.get(k) is None]
    if missing:
        raise DataError(f"{where}: missing {' and '.join(missing)} (found {sorted(record)}): {_FIX}")
    if record.get("prompt") is None:
        prompt, chosen, rejected = _split_prompt(record, where)
    else:
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        prompt = system + _messages(record["prompt"], "user", f"{where}: prompt")
        chosen = _messages(record["chosen"], "assistant", f"{where}: chosen")
        rejected = _messages(record["rejected"], "assistant", f"{where}: rejected")
    for name, reply in zip(REPLIES, (chosen, rejected)):
        if not any(m["role"] == "assistant" and m["content"].strip() for m in reply):
            raise DataError(
                f"{where}: the {name} reply is empty (no assistant turn with text): give both "
                "replies, or remove the record"
            )
    if chosen == rejected:
        raise DataError(_SAME.format(where))
    extra = {k: v for k, v in record.items() if k not in ("prompt", "system", *REPLIES)}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def _messages(value: Any, role: str, where: str) -> List[Message]:
    """A prompt or reply: a string (one message of `role`) or a list of messages, checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise DataError(f"{where} is {value!r}: give a string or a list of messages")
    return [dict(zip(("role", "content"), check_message(m, i, where))) for i, m in enumerate(value)]


def _split_prompt(record: Dict[str, Any], where: str) -> Tuple[List[Message], ...]:
    """(prompt, chosen, rejected) of two whole conversations: the prompt is their longest common
    run of messages from the start, as TRL's extract_prompt takes it."""
    if not all(isinstance(record[k], list) for k in REPLIES):
        raise DataError(
            f"{where}: no prompt, and chosen/rejected are not conversations to take it from: {_FIX}"
        )
    chosen = _messages(record["chosen"], "assistant", f"{where}: chosen")
    rejected = _messages(record["rejected"], "assistant", f"{where}: rejected")
    if chosen == rejected:  # else the prompt would be all of it and both replies empty
        raise DataError(_SAME.format(where))
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ---------------------------------------------------------------- splits


def iter_pairs(dpo: "DPOConfig", data: "DataConfig", split: str) -> Iterator[Tuple[str, Pair]]:
    """(where, pair) for each pair of `split` ("train" or "val"): dpo.train_files / val_files,
    else dpo.hf_path, else the built-in pairs of data's synthetic chat corpus (see the module)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if not dpo.train_files and not dpo.hf_path:
        if data.source != "synthetic_chat":
            raise DataError(
                "DPO needs preference pairs: set dpo.train_files (e.g. dpo.train_files='[pairs/*.jsonl]') "
                "or dpo.hf_path, or use data=synthetic_chat for the built-in pairs"
            )
        yield from builtin_pairs(data.num_docs, data.seed, "train" if split == "train" else "validation")
        return
    # The same rules as conversations: the held-out fraction, seed and HF split names are data's.
    view = dataclasses.replace(
        data,
        source="chat_files",
        train_files=list(dpo.train_files),
        val_files=list(dpo.val_files),
        hf_path=dpo.hf_path,
    )
    if dpo.train_files:
        if split == "val" and dpo.val_files:
            yield from read_pair_files(dpo.val_files)
        else:
            yield from sources.hold_out(read_pair_files(dpo.train_files), view, split)
        return
    if split == "val" and data.hf_val_split:
        yield from load_hf_pairs(view, data.hf_val_split)
    else:
        yield from sources.hold_out(load_hf_pairs(view, data.hf_train_split), view, split)


def read_pairs(dpo: "DPOConfig", data: "DataConfig", split: str) -> List[Tuple[str, Pair]]:
    """Every (where, pair) of `split`, or a DataError when there is none."""
    pairs = list(iter_pairs(dpo, data, split))
    if not pairs:
        raise DataError(
            f"the {split} split of the preference pairs is empty: check dpo.train_files / dpo.hf_path, "
            "or give dpo.val_files / raise data.val_fraction"
        )
    return pairs


def preference_pairs(dpo: "DPOConfig", data: "DataConfig", split: str) -> List[Pair]:
    """The pairs of `split` (what the evaluate stage measures preference accuracy on)."""
    return [pair for _, pair in read_pairs(dpo, data, split)]


def read_pair_files(patterns: List[str]) -> Iterator[Tuple[str, Pair]]:
    """Pairs of .jsonl / .json / .parquet files (globs allowed), in sorted file order."""
    for path in sources.expand_files(list(patterns)):
        for where, record in _records(path):
            yield where, to_pair(record, where)


def load_hf_pairs(cfg: "DataConfig", split: str) -> Iterator[Tuple[str, Pair]]:
    """Pairs of split `split` of the Hugging Face dataset cfg.hf_path (Hub name or local folder)."""
    for i, record in enumerate(sources.load_hf(cfg, cfg.hf_path, split)):
        where = f"dataset {cfg.hf_path} split {split!r} row {i}"
        yield where, to_pair(dict(record), where)


# ---------------------------------------------------------------- the built-in pairs


def builtin_pairs(num_docs: int, seed: int, split: str) -> Iterator[Tuple[str, Pair]]:
    """A pair for every example of the chat corpus's `split` ("train" or "validation") that ends
    with a short answer: prompt = its messages before that answer, chosen = the answer, rejected =
    `wrong_answer`. Columns "answer", "question" (its kind) and "story_index" are kept."""
    for example in synthetic_chat.iter_chat_examples(split, num_docs, seed):
        if example["answer"] is None:
            continue
        index = example["story_index"]
        pair = {
            "prompt": list(example["messages"][:-1]),
            "chosen": [{"role": "assistant", "content": example["answer"]}],
            "rejected": [{"role": "assistant", "content": wrong_answer(seed, example)}],
            "answer": example["answer"],
            "question": example["question"],
            "story_index": index,
        }
        yield f"built-in pair of chat example {index} (data.seed={seed})", pair


def wrong_answer(seed: int, example: Dict[str, Any]) -> str:
    """A plausible wrong answer to the example's last question, from its own story where it can
    be: the friend for "who", the hero for "friend", the other kind of child, another animal,
    place, thing or food, and for the ending the same sentence about the friend (the demo model's
    own mistake) or another story's ending. Deterministic in (seed, example)."""
    index, kind, answer = example["story_index"], example["question"], example["answer"]
    _, facts = generate_story_with_facts(seed, index)
    hero, friend = facts.hero, facts.friend
    rng = random.Random(f"preference:{seed}:{index}")  # its own stream, like the chat corpus's

    def other(choices: List[str]) -> str:
        return rng.choice([c for c in choices if c != answer])

    if kind == "who":
        return friend.name
    if kind == "friend":
        return hero.name
    if kind == "boy/girl":
        return "girl" if answer == "boy" else "boy"
    if kind == "animal":
        return friend.kind if friend.kind in ANIMALS and friend.kind != answer else other(ANIMALS)
    if kind == "ending":
        if hero.name in answer:
            return answer.replace(hero.name, friend.name)
        later = index + 1
        while generate_story_with_facts(seed, later)[1].ending == answer:
            later += 1
        return generate_story_with_facts(seed, later)[1].ending
    choices = {"where": PLACES, "thing": THINGS, "food": FOODS}
    if kind not in choices:
        raise ValueError(f"no wrong answer for question kind {kind!r} (QUESTION_KINDS changed?)")
    return other(choices[kind])
