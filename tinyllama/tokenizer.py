"""SentencePiece tokenizer: training from any text source, and a thin `Tokenizer` wrapper.

The trained model lives in data/tokenizers/<data.name>-<tokenizer.name>/ next to
`settings.json`, the settings and source description that made it. A second run with the same
settings reuses it; different settings under the same folder are refused (never retrained over).
Training follows Llama and llama2.c: BPE, byte fallback (no text maps to <unk>), split digits,
identity normalisation (decode(encode(text)) == text), unk 0, bos 1, eos 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import sentencepiece as spm

from tinyllama import chat_template
from tinyllama.atomic import building_folder
from tinyllama.config import DataConfig, TokenizerConfig
from tinyllama.data.sources import describe_source, iter_documents
from tinyllama.errors import DataError

MODEL_FILE = "tokenizer.model"
SETTINGS_FILE = "settings.json"
# Settings that change the trained model (name, model_file and threads do not).
_TRAINING_FIELDS = (
    "vocab_size",
    "model_type",
    "byte_fallback",
    "split_digits",
    "character_coverage",
    "pad_id",
    "user_defined_symbols",
    "input_sentence_size",
    "max_train_bytes",
)
# SentencePiece skips sentences longer than this (bytes); we cut long lines to fit instead.
_MAX_SENTENCE_BYTES = 4192


class Tokenizer:
    """A loaded SentencePiece model with its special ids and a fingerprint: the first 16 hex
    digits of the model file's sha256, which names the packed data and checkpoints made with it."""

    def __init__(self, model_path: Union[str, Path]):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise DataError(
                f"tokenizer model {self.model_path} does not exist: train it with "
                f"scripts/train_tokenizer.py or set tokenizer.model_file to an existing .model"
            )
        blob = self.model_path.read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=blob)
        self.fingerprint: str = hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        """Load from a .model file or a folder holding tokenizer.model."""
        path = Path(path)
        return cls(path / MODEL_FILE if path.is_dir() else path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> Optional[int]:
        pad = self.sp.pad_id()
        return None if pad < 0 else pad

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> List[List[int]]:
        """Encode many texts in one call (SentencePiece's C++ threads, `num_threads` of them)."""
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> List[int]:
        """Ids of a conversation [{"role", "content"}, ...] in the chat template (transformers' name
        and meaning; see tinyllama/chat_template.py). add_generation_prompt: end with the
        assistant's piece, ready for the reply."""
        return chat_template.apply_chat_template(self, messages, add_generation_prompt)


def tokenizer_dir(tok_cfg: TokenizerConfig, data_cfg: DataConfig) -> Path:
    return Path(data_cfg.root) / "tokenizers" / f"{data_cfg.name}-{tok_cfg.name}"


def training_settings(tok_cfg: TokenizerConfig, data_cfg: DataConfig) -> dict:
    """What decides the trained model: the tokenizer settings and the training text's source."""
    settings = {k: getattr(tok_cfg, k) for k in _TRAINING_FIELDS}
    settings["user_defined_symbols"] = list(settings["user_defined_symbols"])
    return {"tokenizer": settings, "source": describe_source(data_cfg)}


def ensure_tokenizer(tok_cfg: TokenizerConfig, data_cfg: DataConfig) -> Tokenizer:
    """Return the tokenizer for these settings: `tokenizer.model_file` if set, the saved one if it
    was trained with the same settings on the same source, else train it now (atomically)."""
    if tok_cfg.model_file:
        return Tokenizer.load(tok_cfg.model_file)
    out = tokenizer_dir(tok_cfg, data_cfg)
    wanted = json.loads(json.dumps(training_settings(tok_cfg, data_cfg)))  # tuples -> lists
    if out.exists() and not (out / MODEL_FILE).is_file():
        raise DataError(
            f"{out} exists but holds no {MODEL_FILE}: it was not made by a tokenizer run. "
            f"Move it away, or pick another tokenizer.name."
        )
    if (out / MODEL_FILE).is_file():
        saved = _read_settings(out)
        if saved != wanted:
            raise DataError(
                f"{out} holds a tokenizer trained with other settings ({_diff(saved, wanted)}); "
                f"it is kept untouched. Pick another tokenizer.name (or data.name) for the new settings, "
                f"or delete {out} to retrain it."
            )
        return Tokenizer.load(out)
    train_tokenizer(tok_cfg, data_cfg, out)
    return Tokenizer.load(out)


def train_tokenizer(tok_cfg: TokenizerConfig, data_cfg: DataConfig, out: Path) -> Path:
    """Train a SentencePiece model on the source's train split into `out` (built in a temporary
    folder and renamed into place by tinyllama.atomic, so an interrupted run leaves nothing that
    looks complete)."""
    with building_folder(out) as tmp:
        sentences = _training_sentences(iter_documents(data_cfg, "train"), tok_cfg.max_train_bytes)
        _run_trainer(tok_cfg, sentences, tmp / "tokenizer")
        settings = training_settings(tok_cfg, data_cfg)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    # `out` is ours, or that of another process which trained the same tokenizer first.
    if not (out / MODEL_FILE).is_file():
        raise DataError(f"{out} holds no {MODEL_FILE} after training: move it away and rerun")
    return out


def _training_sentences(docs: Iterator[str], max_bytes: int) -> Iterator[str]:
    """One SentencePiece "sentence" per non-empty line, up to `max_bytes` of text in total."""
    seen = 0
    for doc in docs:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            raw = line.encode("utf-8")
            if len(raw) > _MAX_SENTENCE_BYTES:
                line = raw[:_MAX_SENTENCE_BYTES].decode("utf-8", "ignore")
            seen += len(raw)
            yield line
            if seen >= max_bytes:
                return


def _run_trainer(cfg: TokenizerConfig, sentences: Iterator[str], prefix: Path) -> None:
    counted = _Counted(sentences)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted,
            model_prefix=str(prefix),
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            byte_fallback=cfg.byte_fallback,
            split_digits=cfg.split_digits,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=cfg.num_threads or os.cpu_count() or 1,
            user_defined_symbols=list(cfg.user_defined_symbols),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=cfg.pad_id,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            unk_surface=" \u2047 ",
            self_test_sample_size=0,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(_advice(str(e), cfg, counted)) from None


class _Counted:
    """Iterator wrapper counting the sentences SentencePiece consumed (for error messages)."""

    def __init__(self, it: Iterator[str]):
        self.it, self.n, self.bytes = it, 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        s = next(self.it)
        self.n += 1
        self.bytes += len(s.encode("utf-8"))
        return s


def _advice(msg: str, cfg: TokenizerConfig, counted: _Counted) -> str:
    corpus = f"{counted.n} lines, about {counted.bytes / 1e6:.2f} MB"
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
    if too_high:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} is more than this corpus supports ({corpus}): "
            f"SentencePiece can make at most {too_high.group(2)} pieces from it. Lower "
            f"tokenizer.vocab_size (e.g. tokenizer=bpe_512), or train on more text "
            f"(data.num_docs / more files)."
        )
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_small:
        return (
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: the special ids, the 256 byte "
            f"pieces (byte_fallback) and the corpus's characters need at least {too_small.group(2)}. "
            f"Raise tokenizer.vocab_size (or lower tokenizer.character_coverage)."
        )
    if counted.n == 0:
        return "the tokenizer's training text is empty: check data.train_files / the source"
    return f"SentencePiece could not train on {corpus} with these settings: {msg}"


def _read_settings(folder: Path) -> dict:
    try:
        return json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _diff(saved: dict, wanted: dict) -> str:
    """Name the settings that differ, e.g. 'tokenizer.vocab_size: 512 -> 4096'."""
    parts = []
    for group in ("tokenizer", "source"):
        a, b = saved.get(group, {}), wanted.get(group, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                parts.append(f"{group}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return "; ".join(parts) or "settings.json is missing or unreadable"
