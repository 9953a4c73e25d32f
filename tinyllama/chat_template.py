"""The chat template: how the turns of a conversation become token ids, and which ids carry loss.

A conversation is `[{"role": "system"|"user"|"assistant", "content": str}, ...]`. It is written as

    <s><|system|>You are ...<|end|><|user|>Who is ...?<|end|><|assistant|>Mia<|end|>

with four reserved pieces, SentencePiece `user_defined_symbols` that text never splits into:
one per role, and `<|end|>`, the end-of-turn token that generation stops at. A reply is
prompted by ending the ids with `<|assistant|>` (`add_generation_prompt=True`).

Why role pieces and not ChatML's `<|im_start|>assistant\\n ... <|im_end|>`: SentencePiece adds
its dummy "▁" to the start of each stretch of text between special pieces (transformers does
so for every stretch, which is what the exported tokenizer must match). With ChatML the role
name, the newline and the first words of the content share one stretch, so a reply's first
word is encoded unlike the same word inside a sentence ("Mia" instead of "▁Mia"): copying an
answer out of the story becomes harder for a small model, and the label boundary between
template and content can fall inside a token. With one piece per role, every message's
content is its own stretch: its ids are exactly `tokenizer.encode(content)`, the boundary
between template and content is always a token boundary, and ours and transformers' ids
agree by construction. No newlines are needed around the pieces (they would cost two tokens
a turn, "▁" and the newline byte).

A tokenizer without the pieces is refused (`missing_pieces`, `require_chat_pieces`), not
grown: adding pieces to a trained SentencePiece model changes its fingerprint (so its packed
data and checkpoints no longer match it), and the new embeddings would start untrained, to be
learnt from the fine-tuning data alone. Every tokenizer preset carries the pieces instead, so
any model pretrained with one can be fine-tuned for chat.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple, Union

from tinyllama.errors import ConfigError, DataError

if TYPE_CHECKING:
    from tinyllama.tokenizer import Tokenizer

SYSTEM_PIECE, USER_PIECE, ASSISTANT_PIECE, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
ROLE_PIECES: Dict[str, str] = {"system": SYSTEM_PIECE, "user": USER_PIECE, "assistant": ASSISTANT_PIECE}
ROLES = tuple(ROLE_PIECES)
CHAT_PIECES = (SYSTEM_PIECE, USER_PIECE, ASSISTANT_PIECE, END_OF_TURN)
IGNORE_INDEX = -100
"""Label of the tokens that carry no loss (the model's cross-entropy skips it)."""

Message = Dict[str, str]

# transformers renders this (Jinja, `chat_template` in tokenizer_config.json) and then encodes the
# string with the exported tokenizer.json; it must give the same ids as apply_chat_template below.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def missing_pieces(tokenizer: "Tokenizer") -> List[str]:
    """The chat pieces this tokenizer lacks (empty: it can encode conversations)."""
    sp = tokenizer.sp
    return [p for p in CHAT_PIECES if sp.piece_to_id(p) == sp.unk_id()]


def require_chat_pieces(tokenizer: "Tokenizer") -> None:
    """Refuse a tokenizer that lacks the chat pieces, saying what to do."""
    missing = missing_pieces(tokenizer)
    if missing:
        raise ConfigError(
            f"tokenizer {tokenizer.model_path} has no chat pieces {missing}, so it cannot mark the turns "
            f"of a conversation. Pretrain the base model with a tokenizer that has them: "
            f"tokenizer.user_defined_symbols={list(CHAT_PIECES)} (every tokenizer preset has them), "
            f"then fine-tune that run. Pieces are not added to a trained tokenizer: its fingerprint, "
            f"packed data and checkpoints would no longer match."
        )


def end_of_turn_id(tokenizer: "Tokenizer") -> int:
    """Id of `<|end|>`: the token a reply ends with, and generation's stop token."""
    require_chat_pieces(tokenizer)
    return tokenizer.sp.piece_to_id(END_OF_TURN)


def encode_text(tokenizer: "Tokenizer", text: str) -> List[int]:
    """Ids of `text` as the exported tokenizer gives them: special pieces written in the text (<s>,
    </s>, the chat pieces) become their ids, and each stretch between them is encoded on its own
    (with SentencePiece's dummy "▁" prefix, as transformers does)."""
    specials = _special_ids(tokenizer)
    ids: List[int] = []
    for part in _splitter(tuple(specials)).split(text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tokenizer.encode(part))
    return ids


def encode_conversation(
    tokenizer: "Tokenizer", messages: Sequence[Message], train_on: str = "assistant"
) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of one conversation, both of length T.

    labels[t] is input_ids[t] where the token carries loss, else IGNORE_INDEX (the model shifts
    labels itself, as transformers does). train_on="assistant": only the assistant turns' content
    and their `<|end|>` (so the model learns to stop); <s>, the role pieces, system and user turns
    get IGNORE_INDEX. train_on="all": every token.
    """
    if train_on not in ("assistant", "all"):
        raise ConfigError(f"train_on={train_on!r}: use 'assistant' or 'all'")
    require_chat_pieces(tokenizer)
    sp = tokenizer.sp
    end = sp.piece_to_id(END_OF_TURN)
    input_ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for i, message in enumerate(messages):
        role, content = check_message(message, i)
        body = encode_text(tokenizer, content) + [end]
        input_ids += [sp.piece_to_id(ROLE_PIECES[role])] + body
        labels += [IGNORE_INDEX] + (body if role == "assistant" else [IGNORE_INDEX] * len(body))
    if train_on == "all":
        labels = list(input_ids)
    return input_ids, labels


def apply_chat_template(
    tokenizer: "Tokenizer", messages: Sequence[Message], add_generation_prompt: bool = False
) -> List[int]:
    """Ids of `messages` in the chat template (transformers' name and meaning). With
    add_generation_prompt the ids end with `<|assistant|>`, ready for the model to reply."""
    ids, _ = encode_conversation(tokenizer, messages)
    if add_generation_prompt:
        ids.append(tokenizer.sp.piece_to_id(ASSISTANT_PIECE))
    return ids


def add_chat_template(folder: Union[str, Path], template: str = CHAT_TEMPLATE) -> None:
    """Write `template` as `chat_template` into the tokenizer_config.json of an exported folder."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_message(message: Message, index: int, where: str = "") -> Tuple[str, str]:
    """(role, content) of message `index`, or one DataError (`where` names the record) for a
    message without role or content, an unknown role, or content that is not a string."""
    at = f"{where}: message {index}" if where else f"message {index}"
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{at} is {message!r}: each message needs 'role' and 'content'")
    role, content = message["role"], message["content"]
    if role not in ROLE_PIECES:
        raise DataError(
            f"{at} has unknown role {role!r}: use one of {', '.join(ROLES)} (rename it in the data)"
        )
    if not isinstance(content, str):
        raise DataError(f"{at} ({role}) has content {content!r}: it must be a string")
    return role, content


def _special_ids(tokenizer: "Tokenizer") -> Dict[str, int]:
    """The pieces the exported tokenizer treats as added tokens: the control pieces and the chat pieces."""
    sp = tokenizer.sp
    ids = [i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None and i >= 0]
    ids += [sp.piece_to_id(p) for p in CHAT_PIECES if p not in missing_pieces(tokenizer)]
    return {sp.id_to_piece(i): i for i in ids}


_SPLITTERS: Dict[Tuple[str, ...], "re.Pattern[str]"] = {}


def _splitter(pieces: Tuple[str, ...]) -> "re.Pattern[str]":
    """A regex whose split() keeps the pieces (longest first, as added tokens match)."""
    if pieces not in _SPLITTERS:
        alternatives = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
        _SPLITTERS[pieces] = re.compile(f"({alternatives})")
    return _SPLITTERS[pieces]
