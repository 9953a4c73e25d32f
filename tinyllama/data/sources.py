"""Text sources: each yields the documents (str) of a train or a validation split.

    synthetic    the built-in story corpus (tinyllama.data.synthetic), offline and seeded
    synthetic_zh the same in Chinese (tinyllama.data.synthetic_zh)
    tinystories  roneneldan/TinyStories from the Hugging Face Hub, or local copies (data.train_files)
    text_files   your own .txt / .jsonl / .json / .parquet files or globs
    hf           any Hugging Face dataset by name (or a local folder / save_to_disk folder)

Files are read line by line, so memory does not grow with their size (a .json file, a single
JSON value, is read whole: use .jsonl for large corpora). Bad input gets a clear
error (a glob matching nothing, no documents at all, a missing text field) or a warning that
says what was done about it (an empty file is skipped; bytes that are not UTF-8 are replaced
with U+FFFD and counted).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Dict, Iterator, List
from urllib.parse import urlparse

from tinyllama.config import SOURCES, DataConfig
from tinyllama.data import synthetic, synthetic_zh
from tinyllama.errors import DataError

TINYSTORIES = "roneneldan/TinyStories"
# The built-in story corpora among config.SOURCES: source name -> generate_story(seed, index).
STORY_CORPORA = {"synthetic": synthetic.generate_story, "synthetic_zh": synthetic_zh.generate_story}


class DataWarning(UserWarning):
    """Input that was accepted after a repair (skipped empty file, replaced invalid bytes)."""


def describe_source(cfg: DataConfig) -> Dict:
    """The settings that decide which documents a source yields (stored with every artifact)."""
    d: Dict = {"source": cfg.source, "max_docs": cfg.max_docs}
    if cfg.source in STORY_CORPORA:
        d.update(num_docs=cfg.num_docs, seed=cfg.seed)
    elif cfg.source in ("tinystories", "hf") and not cfg.train_files:
        d.update(
            hf_path=cfg.hf_path or (TINYSTORIES if cfg.source == "tinystories" else None),
            hf_name=cfg.hf_name,
            hf_train_split=cfg.hf_train_split,
            hf_val_split=cfg.hf_val_split,
            text_field=cfg.text_field,
        )
    else:
        d.update(
            train_files=list(cfg.train_files),
            val_files=list(cfg.val_files),
            doc_separator=cfg.doc_separator,
            text_field=cfg.text_field,
        )
    if _held_out(cfg):
        d.update(val_fraction=cfg.val_fraction, seed=cfg.seed)
    return d


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Yield the non-empty documents of `split` ("train" or "val"); DataError if there are none."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if cfg.source not in SOURCES:
        raise DataError(f"data.source={cfg.source!r}: choose one of {', '.join(SOURCES)}")
    n = 0
    for doc in _split_docs(cfg, split):
        if not doc.strip():
            continue
        if split == "train" and cfg.max_docs is not None and n >= cfg.max_docs:
            break
        n += 1
        yield doc
    if n == 0:
        raise DataError(
            f"the {split} split of data={cfg.name} ({_where(cfg, split)}) holds no documents: "
            f"check the files' contents, data.doc_separator and data.text_field"
            + (", or raise data.val_fraction / give data.val_files" if split == "val" else "")
        )


def _split_docs(cfg: DataConfig, split: str) -> Iterator[str]:
    if cfg.source in STORY_CORPORA:
        story = STORY_CORPORA[cfg.source]
        if split == "train":
            return synthetic.iter_stories(cfg.num_docs, cfg.seed, story=story)
        # Validation stories continue the index sequence, so they never repeat a train story's draw.
        return synthetic.iter_stories(max(1, cfg.num_docs // 50), cfg.seed, cfg.num_docs, story=story)
    if cfg.source == "text_files" and not cfg.train_files:
        raise DataError(
            "data=text_files needs data.train_files: a list of files or globs, e.g. "
            "data.train_files='[my_texts/*.txt]'"
        )
    if cfg.train_files:  # text_files, or local copies for tinystories / hf
        if split == "val" and cfg.val_files:
            return _read_files(cfg.val_files, cfg)
        return hold_out(_read_files(cfg.train_files, cfg), cfg, split)
    path = cfg.hf_path or (TINYSTORIES if cfg.source == "tinystories" else None)
    if not path:
        raise DataError("data=hf needs data.hf_path: a Hugging Face dataset name or a local dataset folder")
    if split == "val" and cfg.hf_val_split:
        return _hf_docs(cfg, path, cfg.hf_val_split)
    return hold_out(_hf_docs(cfg, path, cfg.hf_train_split), cfg, split)


def _held_out(cfg: DataConfig) -> bool:
    """True when validation is a fraction of the train documents (no val files / split given)."""
    if cfg.source in STORY_CORPORA:
        return False
    return not cfg.val_files if cfg.train_files else not cfg.hf_val_split


def hold_out(docs: Iterator[str], cfg: DataConfig, split: str) -> Iterator[str]:
    """Deterministic split by a hash of (seed, document index): the same documents go to
    validation on every run and every machine, without reading the corpus twice."""
    if not _held_out(cfg):
        if split == "train":
            yield from docs
        return
    cut = int(cfg.val_fraction * 2**64)
    for i, doc in enumerate(docs):
        key = hashlib.blake2b(f"{cfg.seed}:{i}".encode(), digest_size=8).digest()
        in_val = int.from_bytes(key, "little") < cut
        if in_val == (split == "val"):
            yield doc


def _where(cfg: DataConfig, split: str) -> str:
    if cfg.source in STORY_CORPORA:
        return f"{cfg.source}, num_docs={cfg.num_docs}"
    files = cfg.val_files if split == "val" and cfg.val_files else cfg.train_files
    return f"files {list(files)}" if files else f"dataset {cfg.hf_path or TINYSTORIES}"


# ---------------------------------------------------------------- local files


def expand_files(patterns: List[str]) -> List[Path]:
    """Files named by the patterns (globs allowed, ~ expanded), in a stable sorted order."""
    files: List[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(
                f"{pattern!r} matches no file (working directory {os.getcwd()}): "
                f"check the path or glob in data.train_files / data.val_files"
            )
        files += [Path(m) for m in matches]
    return files


def _read_files(patterns: List[str], cfg: DataConfig) -> Iterator[str]:
    for path in expand_files(patterns):
        if path.stat().st_size == 0:
            warnings.warn(f"{path} is empty; skipped", DataWarning, stacklevel=2)
            continue
        bad = [0]  # invalid UTF-8 sequences replaced in this file
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _read_parquet(path, cfg.text_field)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, cfg.text_field, bad)
        elif suffix == ".json":
            yield from _read_json(path, cfg.text_field, bad)
        else:
            yield from _read_txt(path, cfg.doc_separator, bad)
        if bad[0]:
            warnings.warn(
                f"{path}: {bad[0]} byte sequence(s) are not valid UTF-8; replaced with U+FFFD",
                DataWarning,
                stacklevel=2,
            )


def _decode(raw: bytes, bad: List[int]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD that were already in the text (as valid bytes) are not counted as repairs.
        bad[0] += text.count("\ufffd") - raw.count("\ufffd".encode())
        return text


def _read_txt(path: Path, separator: str, bad: List[int]) -> Iterator[str]:
    """Documents split by a separator line, by blank lines, or one per file ("file")."""
    with open(path, "rb") as f:
        if separator == "file":
            yield _decode(f.read(), bad).strip()
            return
        lines: List[str] = []
        for raw in f:
            line = _decode(raw, bad)
            stripped = line.strip()
            if (stripped == "") if separator == "blank_lines" else (stripped == separator):
                if lines:
                    yield "".join(lines).strip()
                lines = []
            else:
                lines.append(line)
        if lines:
            yield "".join(lines).strip()


def _field(record, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no text field {field!r} (found {keys}): set data.text_field")
    return record[field] or ""


def _read_jsonl(path: Path, field: str, bad: List[int]) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, bad).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); each line of a .jsonl "
                    f"file must be one JSON object"
                ) from None
            yield _field(record, field, f"{path}:{lineno}")


def _read_json(path: Path, field: str, bad: List[int]) -> Iterator[str]:
    try:
        records = json.loads(_decode(path.read_bytes(), bad))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(records, dict) and isinstance(records.get(field), list):
        records = records[field]  # {"text": ["doc", "doc", ...]}
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of objects with a {field!r} field (or of strings)")
    for i, record in enumerate(records):
        yield _field(record, field, f"{path}[{i}]")


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (found {pf.schema_arrow.names}): set data.text_field")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        yield from (t or "" for t in batch.column(0).to_pylist())


# ---------------------------------------------------------------- Hugging Face datasets


def _hf_docs(cfg: DataConfig, path: str, split: str) -> Iterator[str]:
    ds = load_hf(cfg, path, split)
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise DataError(
            f"dataset {path} split {split!r} has no column {cfg.text_field!r} "
            f"(columns: {columns}): set data.text_field"
        )
    for batch in ds.iter(batch_size=1024):
        yield from (t or "" for t in batch[cfg.text_field])


def load_hf(cfg: DataConfig, path: str, split: str):
    import datasets

    local = Path(os.path.expanduser(path))
    if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(str(local))  # a folder written by Dataset(Dict).save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(
                    f"{local} has no split {split!r} (splits: {list(ds)}): set data.hf_train_split / hf_val_split"
                )
            ds = ds[split]
        return ds.to_iterable_dataset() if cfg.streaming else ds
    if not local.exists() and not _offline_mode() and not _hub_reachable():
        raise DataError(_offline_advice(cfg, path))
    try:
        return datasets.load_dataset(path, cfg.hf_name, split=split, streaming=cfg.streaming)
    except (ConnectionError, OSError) as e:
        raise DataError(_offline_advice(cfg, path) + f" ({type(e).__name__}: {e})") from None
    except ValueError as e:  # an unknown split or config
        raise DataError(
            f"could not load split {split!r} of dataset {path} (config {cfg.hf_name!r}): {e}"
        ) from None
    except Exception as e:  # datasets raises its own types (DatasetNotFoundError, ...) for a missing dataset
        if "offline" in str(e).lower() or "connect" in str(e).lower():
            raise DataError(_offline_advice(cfg, path) + f" ({type(e).__name__}: {e})") from None
        raise DataError(
            f"could not load dataset {path} (config {cfg.hf_name!r}, split {split!r}): "
            f"{type(e).__name__}: {e}"
        ) from None


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: datasets then uses its cache and fails fast without it."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Probe the Hub for a few seconds, rather than let datasets retry for minutes offline."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_advice(cfg: DataConfig, path: str) -> str:
    example = (
        "data.train_files='[/path/TinyStories-train.txt]' data.val_files='[/path/TinyStories-valid.txt]'"
        if cfg.source == "tinystories"
        else "data.hf_path=/path/to/a/local/dataset/folder (or data=text_files data.train_files='[...]')"
    )
    return (
        f"cannot reach the Hugging Face Hub to load {path!r} (offline, or HF_HUB_OFFLINE / "
        f"HF_DATASETS_OFFLINE is set and no cached copy exists). Point it at local files instead: "
        f"{example}. .txt (stories separated by <|endoftext|> lines), .jsonl/.json with a "
        f"{cfg.text_field!r} field, and parquet files all work."
    )


__all__ = ["iter_documents", "describe_source", "expand_files", "DataWarning"]
