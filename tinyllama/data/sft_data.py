"""Conversations as a data product on disk, and the batches the loop trains and validates on.

Layout of data/packed/<data.name>/<tokenizer fingerprint>/<packing>-<train_on>-<overflow>-T<seq_len>/
(the windows depend on all of these, so each combination has its own folder):

    meta.json                   tokenizer fingerprint, vocab size, seq_len, the settings, the
                                source description, and per split the window count and the
                                PackingStats (conversations, truncated, dropped, real and loss tokens)
    train/input_ids.bin ...     (windows, seq_len) int32 each, little-endian: input_ids, labels
    train/labels.bin            (IGNORE_INDEX where no loss), position_ids, segment_ids
    val/...                     (see tinyllama.data.sft_batches.Window)

Each split's conversations are encoded with the chat template (train_on decides the labels) and
packed by `pack_windows`, streamed row by row to the files; the folder is built under a temporary
name and renamed into place (tinyllama.atomic). Bad records are refused by the readers
(tinyllama.data.conversations) before the folder appears.

Batches are `ModelBatch`es: the model's keyword arguments, `model(**batch.inputs)`, with
shift_labels (targets aligned with input_ids, as the document loader's y) and, for packed
windows, position_ids restarting per conversation and the block-diagonal attention mask. Padded
windows need neither: their one conversation starts at position 0 and padding only follows it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from tinyllama.atomic import building_folder
from tinyllama.chat_template import encode_conversation
from tinyllama.config import DataConfig
from tinyllama.data import synthetic_chat
from tinyllama.data.conversations import iter_conversations
from tinyllama.data.loader import ModelBatch, ResumableLoader
from tinyllama.data.pack import META_FILE, packed_dir
from tinyllama.data.sft_batches import WINDOW_FIELDS, PackingStats, SFTBatch, pack_windows, padding_id
from tinyllama.data.sources import describe_source
from tinyllama.errors import DataError

CHAT_FORMAT = 1
FIELDS = WINDOW_FIELDS
DTYPE = np.dtype("<i4")


def describe_chat_source(cfg: DataConfig) -> Dict:
    """What decides a chat source's conversations: for the built-in corpus its size, seed and
    version (a corpus made by another version of the generator is refused, not reused);
    otherwise describe_source plus, for a dataset, its name and splits."""
    if cfg.source == "synthetic_chat":
        return {
            "source": cfg.source,
            "num_docs": cfg.num_docs,
            "seed": cfg.seed,
            "version": synthetic_chat.VERSION,
        }
    d = describe_source(cfg)
    if cfg.source == "chat_files" and not cfg.train_files:
        d.update(hf_path=cfg.hf_path, hf_name=cfg.hf_name, hf_train_split=cfg.hf_train_split)
        d.update(hf_val_split=cfg.hf_val_split, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return json.loads(json.dumps(d))


def chat_packed_dir(cfg: DataConfig, tokenizer, seq_len: int) -> Path:
    return packed_dir(cfg, tokenizer) / f"{cfg.packing}-{cfg.train_on}-{cfg.overflow}-T{seq_len}"


def ensure_chat_packed(cfg: DataConfig, tokenizer, seq_len: int) -> Path:
    """The packed windows of this chat source for this tokenizer and seq_len, made if missing;
    an existing folder is reused after checking it was made by the same tokenizer and source."""
    out = chat_packed_dir(cfg, tokenizer, seq_len)
    if not out.exists():
        with building_folder(out) as tmp:
            splits = {split: _pack_split(cfg, tokenizer, seq_len, tmp, split) for split in ("train", "val")}
            meta = {
                "format": CHAT_FORMAT,
                "tokenizer": {
                    "fingerprint": tokenizer.fingerprint,
                    "vocab_size": tokenizer.vocab_size,
                    "model_path": str(tokenizer.model_path),
                },
                "seq_len": seq_len,
                "packing": cfg.packing,
                "train_on": cfg.train_on,
                "overflow": cfg.overflow,
                "source": describe_chat_source(cfg),
                "splits": splits,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # written last
    meta = read_chat_meta(out)
    if meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        raise DataError(
            f"{out} was packed with tokenizer {meta['tokenizer']['fingerprint']}, not "
            f"{tokenizer.fingerprint} ({tokenizer.model_path}): its token ids would be misread. "
            "Delete it, or use the tokenizer that made it."
        )
    if meta["source"] != describe_chat_source(cfg):
        raise DataError(
            f"{out} was packed from another source ({meta['source']}) than data={cfg.name} now "
            f"describes; it is kept untouched. Use another data.name, or delete {out} to repack."
        )
    return out


def _pack_split(cfg: DataConfig, tokenizer, seq_len: int, folder: Path, split: str) -> Dict:
    """Encode and pack one split into folder/split/*.bin; return its window count and stats."""
    (folder / split).mkdir()
    stats = PackingStats()
    encoded = (
        encode_conversation(tokenizer, c["messages"], cfg.train_on) for c in iter_conversations(cfg, split)
    )
    pad_id = padding_id(tokenizer)
    files = {name: open(folder / split / f"{name}.bin", "wb") for name in FIELDS}
    try:
        for window in pack_windows(encoded, seq_len, pad_id, cfg.overflow, stats, cfg.packing):
            for name, f in files.items():
                np.asarray(getattr(window, name), dtype=DTYPE).tofile(f)
    finally:
        for f in files.values():
            f.close()
    if stats.windows == 0:
        raise DataError(
            f"the {split} split of data={cfg.name} has no conversation that fits train.seq_len="
            f"{seq_len} ({stats.dropped} dropped): raise train.seq_len or use data.overflow=truncate"
        )
    return {
        "windows": stats.windows,
        "conversations": stats.conversations,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "window_tokens": stats.window_tokens,
        "real_tokens": stats.real_tokens,
        "loss_tokens": stats.loss_tokens,
        "real_share": stats.real_share,
        "loss_share": stats.loss_tokens / max(1, stats.window_tokens),
    }


def read_chat_meta(folder: Path) -> Dict:
    """meta.json of a packed chat folder, after checking that every file it implies is whole."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        raise DataError(
            f"{folder} is not complete packed conversations (no readable {META_FILE}): delete it and rerun"
        ) from None
    for split, info in meta["splits"].items():
        size = info["windows"] * meta["seq_len"] * DTYPE.itemsize
        for name in FIELDS:
            f = folder / split / f"{name}.bin"
            if not f.is_file() or f.stat().st_size != size:
                raise DataError(f"{f} is missing or truncated: delete {folder} and rerun")
    return meta


def packing_report(meta: Dict) -> str:
    """One line per split for the run's first log lines: windows, shares, and what overflowed."""
    lines = []
    for split, s in meta["splits"].items():
        lines.append(
            f"{split}: {s['conversations']} conversations -> {s['windows']} windows of {meta['seq_len']} "
            f"tokens ({meta['packing']}, loss on {meta['train_on']} tokens): real tokens "
            f"{s['real_share']:.1%}, loss tokens {s['loss_share']:.1%}; {s['truncated']} truncated and "
            f"{s['dropped']} dropped (longer than {meta['seq_len']} tokens, data.overflow={meta['overflow']})"
        )
    return "\n".join(lines)


class ChatWindows:
    """The windows of one split, memory-mapped: rows(indices) -> a ModelBatch."""

    def __init__(self, folder: Path, meta: Dict, split: str):
        if split not in meta["splits"]:
            raise DataError(f"{folder} has no split {split!r} (splits: {list(meta['splits'])})")
        self.n, self.seq_len = meta["splits"][split]["windows"], meta["seq_len"]
        self.packed = meta["packing"] == "packed"
        shape = (self.n, self.seq_len)
        self.arrays = {
            name: np.memmap(Path(folder) / split / f"{name}.bin", dtype=DTYPE, mode="r", shape=shape)
            for name in FIELDS
        }

    def batch(self, rows: np.ndarray) -> ModelBatch:
        """The windows `rows` as model inputs: (B, T) int64 tensors (+ the (B, 1, T, T) mask)."""
        t = {name: torch.from_numpy(a[rows].astype(np.int64)) for name, a in self.arrays.items()}
        return SFTBatch(**t).inputs(self.packed)


def _per_rank(windows: ChatWindows, folder: Path, split: str, world_size: int) -> int:
    per_rank = windows.n // world_size
    if per_rank == 0:
        raise DataError(
            f"the {split} split of {folder} has {windows.n} windows, fewer than the {world_size} ranks: "
            "give the source more conversations or use fewer ranks"
        )
    return per_rank


class SFTBatchLoader(ResumableLoader):
    """Seeded random training batches of packed conversation windows, the interface of
    BatchLoader: each epoch a permutation from (seed, epoch) dealt to ranks round-robin, so ranks
    read disjoint windows and share the position (epoch, windows taken); resumable exactly."""

    def __init__(
        self, folder, split: str, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.packed_dir = Path(folder)
        self.meta = read_chat_meta(self.packed_dir)
        if self.meta["seq_len"] != seq_len:
            raise DataError(
                f"{folder} holds windows of {self.meta['seq_len']} tokens, not train.seq_len={seq_len}"
            )
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.windows = ChatWindows(self.packed_dir, self.meta, split)
        _per_rank(self.windows, self.packed_dir, split, world_size)  # one window per rank at least
        self._start(rank, world_size)

    def _epoch_order(self, epoch: int) -> Tuple[None, np.ndarray]:
        """The order of the windows in `epoch`, from (seed, epoch)."""
        return None, np.random.default_rng([self.seed, epoch]).permutation(self.windows.n)

    def next_batch(self) -> ModelBatch:
        """The next batch_size windows; epochs roll over without a gap."""
        return self.windows.batch(np.array([i for _, i in self._next_items()]))

    next_inputs = next_batch


def sft_eval_batches(
    folder,
    split: str,
    batch_size: int,
    max_batches: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Dict[str, torch.Tensor]]:
    """The windows of a split in order, as model keyword arguments (tinyllama.evaluate.evaluate_loss
    takes them); each rank reads its own contiguous block, all ranks the same batch count."""
    folder = Path(folder)
    windows = ChatWindows(folder, read_chat_meta(folder), split)
    per_rank = _per_rank(windows, folder, split, world_size)
    first = rank * per_rank
    for b, i in enumerate(range(first, first + per_rank, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield windows.batch(np.arange(i, min(i + batch_size, first + per_rank))).inputs
