"""Packing: documents -> one flat token stream per split, in shard files, plus meta.json.

Layout of data/packed/<data.name>/<tokenizer fingerprint>/ (the loader reads only this):

    meta.json            tokenizer fingerprint, vocab size, special ids, dtype, token and
                         document counts, shard list, the source description
    train/00000.bin ...  raw little-endian uint16 (vocab <= 65536) or uint32 tokens
    val/00000.bin ...

Each document is written as BOS + tokens + EOS, so a model learns where a story starts and
ends. Worker threads encode ~256 KB chunks of documents while the main thread reads documents
and writes shards, in input order (so the output does not depend on the number of workers) and
with a few chunks in flight at most: memory stays flat however large the corpus. Threads, not
processes: SentencePiece's C++ encoder releases the GIL, so N threads encode on N cores with no
pickling of text and token arrays between processes (that copying made processes cost more
CPU: BENCHMARKS.md, data packing). The folder is built under a temporary name and renamed into place (tinyllama.atomic), so
an interrupted run never leaves a complete-looking output.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from tinyllama.atomic import building_folder
from tinyllama.config import DataConfig
from tinyllama.data.sources import describe_source, iter_documents
from tinyllama.errors import DataError

META_FILE = "meta.json"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 18  # text per worker task: amortises per-task overhead, keeps workers evenly loaded


# `tokenizer` below is a tinyllama.tokenizer.Tokenizer, left unannotated: tokenizer training reads
# its text through this package, so importing the tokenizer here, even for typing, closes a cycle.


def packed_dir(data_cfg: DataConfig, tokenizer) -> Path:
    return Path(data_cfg.root) / "packed" / data_cfg.name / tokenizer.fingerprint


def ensure_packed(data_cfg: DataConfig, tokenizer) -> Path:
    """Return the packed folder for this source and tokenizer, packing it first if missing.
    An existing complete folder made from the same source is reused; one made from another
    source or tokenizer is refused (never overwritten)."""
    out = packed_dir(data_cfg, tokenizer)
    if out.exists():
        meta = read_meta(out)
        _check_same(meta, out, data_cfg, tokenizer)
        return out
    with building_folder(out) as tmp:
        meta = _pack(data_cfg, tokenizer, tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # written last
    # `out` is ours, or that of another process which finished first: use it if it is the same.
    _check_same(read_meta(out), out, data_cfg, tokenizer)
    return out


def read_meta(packed_dir: Path) -> Dict:
    """meta.json of a packed folder, after checking that every shard it lists is whole."""
    packed_dir = Path(packed_dir)
    path = packed_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(
            f"{packed_dir} is not complete packed data (no readable {META_FILE}): "
            f"delete it and rerun scripts/prepare_data.py"
        ) from None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        for shard in split["shards"]:
            f = packed_dir / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["tokens"] * itemsize:
                raise DataError(
                    f"{f} is missing or truncated (meta.json lists {shard['tokens']} tokens): "
                    f"delete {packed_dir} and rerun scripts/prepare_data.py"
                )
    return meta


def _check_same(meta: Dict, out: Path, data_cfg: DataConfig, tokenizer) -> None:
    have = meta["tokenizer"]["fingerprint"]
    if have != tokenizer.fingerprint:
        raise DataError(
            f"{out} was packed with tokenizer {have}, not {tokenizer.fingerprint} "
            f"({tokenizer.model_path}): its token ids would be misread. Delete it, or "
            f"use the tokenizer that made it (tokenizer.model_file)."
        )
    wanted = json.loads(json.dumps(describe_source(data_cfg)))
    if meta["source"] != wanted:
        raise DataError(
            f"{out} was packed from another source ({meta['source']}) than data={data_cfg.name} "
            f"now describes ({wanted}); it is kept untouched. Use another data.name for the "
            f"new source, or delete {out} to repack."
        )


def _pack(data_cfg: DataConfig, tokenizer, folder: Path) -> Dict:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    with _encoder(tokenizer.sp, dtype, data_cfg.num_workers) as encode:
        splits = {
            split: pack_documents(
                iter_documents(data_cfg, split), encode, folder, split, dtype, data_cfg.shard_tokens
            )
            for split in ("train", "val")
        }
    return {
        "format": FORMAT_VERSION,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "unk_id": tokenizer.unk_id,
            "pad_id": tokenizer.pad_id,
            "model_path": str(tokenizer.model_path),
        },
        "dtype": dtype.name,
        "source": describe_source(data_cfg),
        "splits": splits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@contextlib.contextmanager
def _encoder(sp: spm.SentencePieceProcessor, dtype: np.dtype, num_workers: int):
    """Yield `encode(chunks) -> iterator of (tokens, n_docs)`, in input order.
    num_workers=0 encodes in the calling thread; n > 0 in n worker threads."""
    encode_chunk = _ChunkEncoder(sp, dtype)
    if num_workers <= 0:
        yield lambda chunks: map(encode_chunk, chunks)
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="pack") as pool:
        yield lambda chunks: _ordered_map(pool, encode_chunk, chunks, in_flight=2 * num_workers)


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, in_flight: int) -> Iterator:
    """Like pool.map, but reads `items` lazily: at most `in_flight` tasks are queued or running.
    (Executor.map would read the whole corpus into memory before returning its first result.)"""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def pack_documents(
    docs: Iterator[str], encode, folder: Path, split: str, dtype: np.dtype, shard_tokens: int
) -> Dict:
    """Encode `docs` as BOS + ids + EOS each into folder/split/*.bin; return the split's counts."""
    writer = _ShardWriter(folder, split, dtype, shard_tokens)
    with tqdm(
        desc=f"packing {split}",
        unit="tok",
        unit_scale=True,
        mininterval=1.0,
        disable=os.environ.get("TINYLLAMA_PROGRESS", "1") == "0",
    ) as bar:
        for tokens, n_docs in encode(_chunks(docs, CHUNK_BYTES)):
            writer.write(tokens, n_docs)
            bar.update(len(tokens))
    return writer.close()


def _chunks(docs: Iterator[str], chunk_bytes: int) -> Iterator[List[str]]:
    """Group documents into lists of about chunk_bytes characters."""
    chunk: List[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _ChunkEncoder:
    """Documents -> (flat token array: BOS ids EOS BOS ids EOS ..., number of documents).
    The tokenizer's own SentencePieceProcessor serves every thread: encoding does not modify it."""

    def __init__(self, sp: spm.SentencePieceProcessor, dtype: np.dtype):
        self.sp, self.dtype = sp, dtype

    def __call__(self, docs: List[str]) -> Tuple[np.ndarray, int]:
        ids = self.sp.encode(docs, add_bos=True, add_eos=True, num_threads=1)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=sum(map(len, ids)))
        return flat, len(docs)


class _ShardWriter:
    """Appends tokens to split/NNNNN.bin files of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens <= 0:
            raise DataError(f"data.shard_tokens={shard_tokens}: must be > 0")
        self.root, self.split, self.dtype, self.limit = folder, split, dtype, shard_tokens
        (folder / split).mkdir(parents=True, exist_ok=True)
        self.shards: List[Dict] = []
        self.tokens = self.docs = 0
        self.file = None

    def write(self, tokens: np.ndarray, n_docs: int) -> None:
        self.docs += n_docs
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == self.limit:
                self._next_shard()
            take = min(len(tokens), self.limit - self.shards[-1]["tokens"])
            self.file.write(tokens[:take].tobytes())
            self.shards[-1]["tokens"] += take
            self.tokens += take
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}/{len(self.shards):05d}.bin"
        self.file = open(self.root / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> Dict:
        if self.file is not None:
            self.file.close()
        return {"tokens": self.tokens, "docs": self.docs, "shards": self.shards}
