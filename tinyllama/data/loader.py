"""Batches (x, y) from packed token shards (memory-mapped, nothing is loaded whole).

A split is one flat token stream (its shards end to end), cut into windows of seq_len + 1
tokens; x is a window's first seq_len tokens and y the same window shifted by one.

Training (`BatchLoader`) reads the windows of an epoch in a seeded random order; every epoch
shifts the window grid by a random offset (< seq_len + 1), so the model sees new cuts of the
text. The epochs' permutations, end to end, are one global order that does not depend on the
number of processes: each micro-step the ranks together take its next world_size x batch_size
windows, dealt round-robin (rank r takes every world_size-th from the r-th). The position
(epoch, windows of it taken by all ranks) is the same on every rank, so `state_dict()` from
rank 0 resumes any number of processes where the run was: 2 ranks x batch 4 and 1 rank x
batch 4 x 2 accumulation read the same 8 windows per step. Evaluation reads non-overlapping windows in order (`window_batches`,
the one evaluation windowing: of packed shards in `eval_batches`, of text in memory in
`tinyllama.evaluate.text_batches`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from tinyllama.chat_template import IGNORE_INDEX
from tinyllama.data.pack import read_meta
from tinyllama.errors import DataError


class TokenStream:
    """The shards of one split as a single read-only token sequence."""

    def __init__(self, packed_dir: Path, meta: Dict, split: str):
        if split not in meta["splits"]:
            raise DataError(f"{packed_dir} has no split {split!r} (splits: {list(meta['splits'])})")
        shards = meta["splits"][split]["shards"]
        self.arrays = [
            np.memmap(Path(packed_dir) / s["file"], dtype=meta["dtype"], mode="r")
            for s in shards
            if s["tokens"]
        ]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays]).tolist()  # offset of each shard
        self.tokens = self.starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), joined across a shard boundary if needed."""
        parts = []
        i = bisect.bisect_right(self.starts, start) - 1
        while length > 0:
            local = start - self.starts[i]
            piece = self.arrays[i][local : local + length]
            parts.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _windows_per_rank(stream: TokenStream, packed_dir: Path, split: str, window: int, world_size: int) -> int:
    per_rank = stream.tokens // window // world_size
    if per_rank == 0:
        raise DataError(
            f"the {split} split of {packed_dir} has {stream.tokens} tokens, but one window of "
            f"seq_len + 1 = {window} tokens"
            + (f" per rank ({world_size} ranks)" if world_size > 1 else "")
            + f" needs at least {window * world_size}: give the source more text (data.num_docs, more "
            f"files) or lower train.seq_len"
        )
    return per_rank


@dataclass
class ModelBatch:
    """One micro-batch as the training loop takes it, for documents and conversations alike.

    inputs: the model's keyword arguments, `model(**inputs)`: input_ids and shift_labels (B, T)
        int64 (targets aligned with input_ids, IGNORE_INDEX -100 where none), and for packed
        conversations position_ids (B, T) and attention_mask (B, 1, T, T) bool.
    real_tokens: tokens of text rather than padding (B * T for documents).
    """

    inputs: Dict[str, torch.Tensor]
    real_tokens: int

    @property
    def loss_tokens(self) -> int:
        """Targets that carry loss."""
        return int((self.inputs["shift_labels"] != IGNORE_INDEX).sum())

    def to(self, device) -> Dict[str, torch.Tensor]:
        """The inputs on `device`."""
        return {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}


def _to_xy(windows: List[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) token windows -> x (B, T), y (B, T) int64 tensors, y[:, t] = x[:, t + 1]."""
    buf = torch.from_numpy(np.stack(windows).astype(np.int64))
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class ResumableLoader:
    """What the training loaders share: the tokenizer check, the seeded global order of the items
    dealt to ranks (see the module docstring), and the resumable position (epoch, items of it
    taken by all ranks). Subclasses set packed_dir, meta, seed, seq_len, batch_size, split, call
    `_start(rank, world_size)` and define `_epoch_order(epoch)` -> (anything the epoch's items
    need, a permutation of its item indices)."""

    packed_dir: Path
    meta: Dict

    def _start(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.taken = 0  # items of this epoch already taken by all ranks together
        self._orders: Dict[int, Tuple[object, np.ndarray]] = {}  # the epochs a micro-step spans

    def _order_of(self, epoch: int) -> Tuple[object, np.ndarray]:
        if epoch not in self._orders:
            self._orders[epoch] = self._epoch_order(epoch)
        return self._orders[epoch]

    def _next_items(self) -> List[Tuple[object, int]]:
        """This rank's batch_size (epoch data, item index) pairs of the next micro-step: the
        global positions taken + rank + i * world_size; epochs roll over without a gap."""
        items = []
        for i in range(self.batch_size):
            epoch, position = self.epoch, self.taken + self.rank + i * self.world_size
            extra, order = self._order_of(epoch)
            while position >= len(order):
                epoch, position = epoch + 1, position - len(order)
                extra, order = self._order_of(epoch)
            items.append((extra, int(order[position])))
        self.taken += self.batch_size * self.world_size
        while self.taken >= len(self._order_of(self.epoch)[1]):
            self.taken -= len(self._orders.pop(self.epoch)[1])
            self.epoch += 1
        return items

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def source(self) -> Dict:
        """What the packed data was made from (its meta's source description)."""
        return self.meta["source"]

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    def check_compatible(self, fingerprint: str, vocab_size: int) -> None:
        """Refuse data made by another tokenizer, or with ids the model's embedding cannot hold."""
        if fingerprint != self.fingerprint:
            raise DataError(
                f"{self.packed_dir} was packed with tokenizer {self.fingerprint}, but the model "
                f"uses tokenizer {fingerprint}: repack the data with the model's tokenizer "
                f"(tokenizer.model_file) or train with the data's tokenizer"
            )
        if self.vocab_size > vocab_size:
            raise DataError(
                f"{self.packed_dir} has vocab size {self.vocab_size}, larger than the model's "
                f"vocab_size={vocab_size}: raise model.vocab_size to at least {self.vocab_size}"
            )

    def state_dict(self) -> Dict:
        return {
            "epoch": self.epoch,
            "taken": self.taken,
            "order": "global",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "source": self.source,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Continue where `state` left off, with any number of ranks; refuse a state that would
        not replay the same order."""
        state = {"source": self.source, **state}  # a checkpoint saved before the source was recorded
        for key in ("seed", "seq_len", "split", "fingerprint", "source"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data loader exactly: the saved {key} is {state[key]!r}, "
                    f"this run has {getattr(self, key)!r}; use the same {key} to resume"
                )
        taken = int(state["taken"])
        if state.get("order") != "global":  # saved when ranks counted their own windows
            taken *= int(state["world_size"])
        self.epoch, self.taken, self._orders = int(state["epoch"]), taken, {}


class BatchLoader(ResumableLoader):
    """Seeded random training batches from a packed split; see the module docstring."""

    def __init__(
        self,
        packed_dir,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.packed_dir = Path(packed_dir)
        self.meta = read_meta(self.packed_dir)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.stream = TokenStream(self.packed_dir, self.meta, split)
        self.window = seq_len + 1
        _windows_per_rank(self.stream, self.packed_dir, split, self.window, world_size)  # one each at least
        self._start(rank, world_size)

    def _epoch_order(self, epoch: int) -> Tuple[int, np.ndarray]:
        """(grid offset, the order of its windows) for `epoch`, from (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        n_windows = self.stream.tokens // self.window
        offset = int(rng.integers(0, self.stream.tokens - n_windows * self.window + 1))
        return offset, rng.permutation(n_windows)

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Next (x, y), both (B, T) int64 on the CPU; epochs roll over without a gap."""
        return _to_xy(
            [self.stream.read(offset + i * self.window, self.window) for offset, i in self._next_items()]
        )

    def next_inputs(self) -> ModelBatch:
        """next_batch as the training loop takes it (see ModelBatch)."""
        x, y = self.next_batch()
        return ModelBatch({"input_ids": x, "shift_labels": y}, real_tokens=x.numel())


def window_batches(
    read: Callable[[int, int], np.ndarray],
    seq_len: int,
    batch_size: int,
    windows: range,
    max_batches: Optional[int] = None,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation windowing: a token sequence cut into non-overlapping windows of seq_len + 1
    tokens from its first token; the windows numbered `windows` in order, batch_size per (x, y)
    batch, (B, T) int64 each (the last may have fewer rows), at most max_batches batches.
    read(start, length) -> the sequence's tokens [start, start + length): `TokenStream.read` for
    packed shards (`eval_batches`), a slice of an array for text tokenized in memory
    (`tinyllama.evaluate.text_batches`)."""
    window = seq_len + 1
    for b, i in enumerate(range(windows.start, windows.stop, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _to_xy([read(j * window, window) for j in range(i, min(i + batch_size, windows.stop))])


def eval_batches(
    packed_dir,
    split: str,
    batch_size: int,
    seq_len: int,
    max_batches: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping (x, y) batches of a packed split (`window_batches`).
    Each rank reads its own contiguous block of windows; all ranks yield the same batch count."""
    packed_dir = Path(packed_dir)
    stream = TokenStream(packed_dir, read_meta(packed_dir), split)
    per_rank = _windows_per_rank(stream, packed_dir, split, seq_len + 1, world_size)
    first = rank * per_rank
    yield from window_batches(stream.read, seq_len, batch_size, range(first, first + per_rank), max_batches)
