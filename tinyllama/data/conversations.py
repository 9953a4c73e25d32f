"""Conversations from your files or a Hugging Face dataset, normalised to chat messages.

Every record becomes `[{"role": "system"|"user"|"assistant", "content": str}, ...]`. Accepted
shapes (the first that matches wins):

    messages             {"messages": [{"role": "user", "content": "..."}, ...]}
    Alpaca               {"instruction": "...", "input": "..." (optional), "output": "..."}
    prompt / completion  {"prompt": "...", "completion": "..."}; either may also be a list of
                         messages (transformers' conversational prompt-completion shape)

An optional "system" string field is put first in the Alpaca and prompt/completion shapes.
Files: .jsonl (one record a line), .json (a list of records), .parquet. A Hugging Face dataset
is given by its Hub name, a local folder of such files, or a `save_to_disk` folder (`datasets`
is imported only then). Bad input is refused with one DataError naming the file and row and the
fix: an unknown role, an empty conversation, no assistant turn, none of the recognised fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Sequence

from tinyllama.chat_template import Message, check_message
from tinyllama.data import sources, synthetic_chat
from tinyllama.errors import DataError

if TYPE_CHECKING:
    from tinyllama.config import DataConfig

SHAPES = ("messages", "instruction/input/output (Alpaca)", "prompt/completion")
_FIX = (
    "give each record a 'messages' list of {role, content} (roles system/user/assistant), or "
    "'instruction' (+ optional 'input') and 'output' (Alpaca), or 'prompt' and 'completion'"
)


def to_messages(record: Any, where: str) -> List[Message]:
    """One record of any accepted shape -> checked messages; `where` names it in errors ("f.jsonl:3")."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}: {_FIX}")
    if "messages" in record:
        messages = record["messages"]
    elif "instruction" in record and "output" in record:
        instruction, extra = record["instruction"], record.get("input")
        user = f"{instruction}\n\n{extra}" if isinstance(instruction, str) and extra else instruction
        messages = _system(record) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ]
    elif "prompt" in record and "completion" in record:
        messages = (
            _system(record)
            + _turns(record["prompt"], "user", where)
            + _turns(record["completion"], "assistant", where)
        )
    else:
        raise DataError(f"{where}: none of the recognised fields (found {sorted(record)}): {_FIX}")
    return check_conversation(messages, where)


def check_conversation(messages: Any, where: str) -> List[Message]:
    """The messages as plain dicts, or one DataError for an empty conversation, a malformed or
    unknown-role message, or a conversation without an assistant turn (nothing to learn from)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: empty conversation (its messages are {messages!r}): give at least a user "
            f"and an assistant message, or remove the record"
        )
    checked = []
    for i, m in enumerate(messages):
        role, content = check_message(m, i, where)
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(
            f"{where}: no assistant turn, so there is nothing to learn from: add the reply as "
            f"an assistant message, or remove the record"
        )
    return checked


def iter_conversations(cfg: "DataConfig", split: str) -> Iterator[Dict[str, Any]]:
    """The conversations of `split` ("train" or "val") of a chat source, each as
    `{"messages": [...], "answer": str or None}`; `answer` is the short reply that the built-in
    corpus checks by exact match (None for your files, and for the built-in corpus's
    story-writing requests and copying drills); the built-in corpus adds "question", the kind of
    question answered (synthetic_chat.QUESTION_KINDS, or None).

    synthetic_chat: the built-in corpus (data.num_docs, data.seed; validation = its held-out
    stories). chat_files: data.train_files / data.val_files, or the Hugging Face dataset
    data.hf_path (data.hf_train_split / data.hf_val_split); without a validation part,
    data.val_fraction of the train conversations is held out, as for documents.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if cfg.source == "synthetic_chat":
        for example in synthetic_chat.iter_chat_examples(
            "train" if split == "train" else "validation", cfg.num_docs, cfg.seed
        ):
            yield {key: example[key] for key in ("messages", "answer", "question")}
        return
    if cfg.source != "chat_files":
        raise DataError(
            f"data.source={cfg.source!r} holds documents, not conversations: use "
            "data=synthetic_chat or data=chat_files for fine-tuning"
        )
    if cfg.train_files:
        if split == "val" and cfg.val_files:
            conversations = read_conversation_files(cfg.val_files)
        else:
            conversations = sources.hold_out(read_conversation_files(cfg.train_files), cfg, split)
    elif cfg.hf_path:
        if split == "val" and cfg.hf_val_split:
            conversations = load_hf_conversations(cfg, cfg.hf_path, cfg.hf_val_split)
        else:
            conversations = sources.hold_out(
                load_hf_conversations(cfg, cfg.hf_path, cfg.hf_train_split), cfg, split
            )
    else:
        raise DataError(
            "data=chat_files needs data.train_files (e.g. data.train_files='[chats/*.jsonl]') or "
            "data.hf_path (a Hugging Face dataset name or folder)"
        )
    n = 0
    for messages in conversations:
        n += 1
        yield {"messages": messages, "answer": None}
    if n == 0:
        raise DataError(
            f"the {split} split of data={cfg.name} holds no conversations: check the files, or "
            "raise data.val_fraction / give data.val_files"
        )


def read_conversation_files(patterns: Sequence[str]) -> Iterator[List[Message]]:
    """Conversations of .jsonl / .json / .parquet files (globs allowed), in sorted file order."""
    for path in sources.expand_files(list(patterns)):
        for where, record in _records(path):
            yield to_messages(record, where)


def load_hf_conversations(cfg: "DataConfig", path: str, split: str) -> Iterator[List[Message]]:
    """Conversations of split `split` of a Hugging Face dataset: a Hub name (cfg.hf_name is its
    config), a local folder or a save_to_disk folder. Offline, a Hub name fails with advice."""
    ds = sources.load_hf(cfg, path, split)
    for i, record in enumerate(ds):
        yield to_messages(dict(record), f"dataset {path} split {split!r} row {i}")


def _records(path: Path) -> Iterable[tuple]:
    """(where, record) for each record of one file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{lineno}", _json(line, f"{path}:{lineno}")
    elif suffix == ".json":
        records = _json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of conversations: {_FIX}")
        yield from ((f"{path}[{i}]", r) for i, r in enumerate(records))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
    else:
        raise DataError(
            f"{path}: conversations are read from .jsonl, .json or .parquet files, not {suffix!r}"
        )


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}): {_FIX}") from None


def _system(record: Dict[str, Any]) -> List[Message]:
    return [{"role": "system", "content": record["system"]}] if record.get("system") else []


def _turns(value: Any, role: str, where: str) -> List[Any]:
    """A prompt or completion: a string (one message of `role`) or already a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: {role} side is {value!r}: give a string or a list of messages")
