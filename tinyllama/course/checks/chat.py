"""Lesson 9 check: the ids and label mask of conversations against tinyllama/chat_template.py, and
the packing mask against tinyllama/model/masks.py (segment_attention_mask)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import ModuleType

import torch

from tinyllama.chat_template import CHAT_PIECES, END_OF_TURN, IGNORE_INDEX, encode_conversation
from tinyllama.config import DataConfig, TokenizerConfig
from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.model.masks import segment_attention_mask
from tinyllama.tokenizer import ensure_tokenizer

CONVERSATIONS = {
    "one question": [
        {"role": "user", "content": "Who is the story about?"},
        {"role": "assistant", "content": "Mia"},
    ],
    "system prompt and two turns": [
        {"role": "system", "content": "You answer in a few words."},
        {"role": "user", "content": "Mia had a red kite. What red thing is in the story?"},
        {"role": "assistant", "content": "kite"},
        {"role": "user", "content": "Who had it?"},
        {"role": "assistant", "content": "Mia, a little girl."},
    ],
}
SEGMENTS = {
    "two conversations": [[1, 1, 1, 2, 2, 2, 2]],
    "three conversations and padding": [[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 2, 2, 0]],
}


def _tokenizer(folder: Path):
    """A small BPE tokenizer with the chat pieces, trained on 300 synthetic stories (a second or two)."""
    return ensure_tokenizer(
        TokenizerConfig(
            name="course_chat", vocab_size=400, num_threads=1, user_defined_symbols=list(CHAT_PIECES)
        ),
        DataConfig(num_docs=300, root=str(folder)),
    )


def _case_conversation(learner: ModuleType, tokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    got = learner_attr(learner, "encode_conversation")(tokenizer, messages)
    ids, labels = encode_conversation(tokenizer, messages)
    if not isinstance(got, tuple) or len(got) != 2:
        raise Mismatch(f"encode_conversation returned {type(got).__name__}: return (input_ids, labels)")
    got_ids, got_labels = list(got[0]), list(got[1])
    if got_ids != ids:
        raise Mismatch(
            f"input_ids {got_ids!r:.160} differ from the template's {ids!r:.160}: <s>, then per "
            f"message its role piece, tokenizer.encode(content) and {END_OF_TURN}"
        )
    if len(got_labels) != len(ids):
        raise Mismatch(f"labels has {len(got_labels)} entries for {len(ids)} input ids: one label per token")
    if got_labels == labels:
        return
    end = tokenizer.sp.piece_to_id(END_OF_TURN)
    learnt = [t for t, label in enumerate(got_labels) if label != IGNORE_INDEX]
    expected = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    roles = [t - 1 for t in expected if t - 1 not in expected]  # the role piece before each reply
    if set(learnt) > set(expected) and set(learnt) - set(expected) == set(roles):
        hint = "the <|assistant|> piece is labelled: it comes with the prompt, the model never writes it"
    elif set(learnt) > set(expected):
        hint = (
            "system/user tokens carry loss: only the assistant's replies are learnt; label the rest "
            f"{IGNORE_INDEX}"
        )
    elif set(expected) - set(learnt) == {t for t in expected if ids[t] == end}:
        hint = f"the reply's {END_OF_TURN} is not labelled: without it the model never learns to stop"
    elif any(got_labels[t] not in (IGNORE_INDEX, ids[t]) for t in range(len(ids))):
        hint = "a label is neither the token's own id nor -100: do not shift, the model shifts labels itself"
    else:
        hint = f"labels {got_labels!r:.200} differ from {labels!r:.200}"
    raise Mismatch(f"{name}: {hint}")


def _case_mask(learner: ModuleType, name: str) -> None:
    segment_ids = torch.tensor(SEGMENTS[name])
    got = learner_attr(learner, "segment_mask")(segment_ids.clone())
    expected = segment_attention_mask(segment_ids)
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, None, :]
    mistakes = {
        "tokens attend to the conversations packed before them: allow only keys of the same segment": (
            causal & real
        )[:, None]
        | torch.eye(t, dtype=torch.bool),
        "tokens see later tokens of their conversation: the mask must stay causal (s <= t) inside a block": (
            (same & real) | torch.eye(t, dtype=torch.bool)
        )[:, None],
        "a padding row that sees nothing turns sdpa's softmax into NaN: let a padding token see itself": (
            same & causal & real
        )[:, None],
        "padding tokens see each other: a padding token (segment 0) attends to itself only": (same & causal)[
            :, None
        ],
    }
    if isinstance(got, torch.Tensor) and got.dtype != torch.bool:
        raise Mismatch(f"segment_mask returned {got.dtype}: return a boolean mask (True = may attend)")
    compare(
        got,
        expected,
        what=f"segment_mask ({name})",
        dims=("B", "1", "T", "S"),
        atol=0,
        rtol=0,
        mistakes={k: v for k, v in mistakes.items() if not torch.equal(v, expected)},
    )


def check(grader: Grader, learner: ModuleType) -> None:
    folder = tempfile.TemporaryDirectory(prefix="course-chat-")
    tokenizer = _tokenizer(Path(folder.name))
    for name in CONVERSATIONS:
        grader.case(
            f"encode_conversation: {name}", lambda name=name: _case_conversation(learner, tokenizer, name)
        )
    for name in SEGMENTS:
        grader.case(f"segment_mask: {name}", lambda name=name: _case_mask(learner, name))
    folder.cleanup()
