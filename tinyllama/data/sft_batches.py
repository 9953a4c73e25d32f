"""Batches for supervised fine-tuning: encoded conversations packed into fixed windows.

Each window of `seq_len` tokens holds whole conversations one after another, then padding.
Packing wastes far fewer tokens than padding every conversation to the longest, but the
conversations of a window must not see each other: each token attends only to the earlier
tokens of its own conversation (a block-diagonal causal mask built from segment ids), and
position ids restart at 0 with every conversation, so a conversation's logits are the same
packed as alone. Padding has label IGNORE_INDEX and segment id 0.

With packing="padded" each window holds one conversation (no mask needed beyond the causal one).

A conversation longer than the window is cut to `seq_len` tokens (overflow="truncate") or
left out (overflow="drop"); either way it is counted in `PackingStats`, for the caller to report.
A cut conversation left with no token that carries loss (its assistant turns were cut off) is
dropped as well: it would teach nothing, and a window without targets has no mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from tinyllama.chat_template import IGNORE_INDEX
from tinyllama.config import OVERFLOW, PACKING
from tinyllama.data.loader import ModelBatch
from tinyllama.errors import ConfigError
from tinyllama.model.masks import segment_attention_mask

Encoded = Tuple[List[int], List[int]]  # (input_ids, labels) of one conversation


@dataclass
class PackingStats:
    """What packing did, to be reported: conversations packed, cut or left out, and token counts."""

    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    windows: int = 0
    window_tokens: int = 0  # windows * seq_len
    real_tokens: int = 0  # conversation tokens placed in windows (not padding)
    loss_tokens: int = 0  # tokens with a label (not IGNORE_INDEX)

    @property
    def real_share(self) -> float:
        """Share of window tokens that are conversation tokens rather than padding."""
        return self.real_tokens / max(1, self.window_tokens)


@dataclass
class Window:
    """One packed row, every list of length seq_len."""

    input_ids: List[int]
    labels: List[int]
    position_ids: List[int]
    segment_ids: List[int]  # 1, 2, ... per conversation; 0 on padding


WINDOW_FIELDS = ("input_ids", "labels", "position_ids", "segment_ids")


@dataclass
class SFTBatch:
    """Windows stacked: input_ids, labels, position_ids, segment_ids (B, T) int64, for
    `model(input_ids, attention_mask=..., position_ids=..., labels=...)`; `inputs()` gives the
    training loop's and evaluation's form of the same batch."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool: block-diagonal causal, each token sees its own conversation only."""
        return segment_attention_mask(self.segment_ids)

    @property
    def real_share(self) -> float:
        """Share of the batch's tokens that are conversation tokens (not padding)."""
        return (self.segment_ids != 0).float().mean().item()

    def inputs(self, packed: bool = True) -> ModelBatch:
        """The model's keyword arguments: input_ids, shift_labels (the label of token t + 1 at t:
        the model does not shift them), and for packed windows position_ids and the mask. Padded
        windows need neither: their one conversation starts at position 0, padding only follows."""
        inputs = {
            "input_ids": self.input_ids,
            "shift_labels": F.pad(self.labels[:, 1:], (0, 1), value=IGNORE_INDEX),
        }
        if packed:
            inputs["position_ids"] = self.position_ids
            inputs["attention_mask"] = self.attention_mask
        return ModelBatch(inputs, real_tokens=int((self.segment_ids != 0).sum()))


def padding_id(tokenizer) -> int:
    """The id that fills a window after its conversations: the tokenizer's pad, else its eos
    (never a target: padding's labels are IGNORE_INDEX)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def pack_windows(
    conversations: Iterable[Encoded],
    seq_len: int,
    pad_id: int,
    overflow: str = "truncate",
    stats: PackingStats | None = None,
    packing: str = "packed",
) -> Iterator[Window]:
    """Fill windows of `seq_len` tokens with whole conversations, in order (a conversation that
    does not fit in what is left of a window starts the next one); packing="padded": one
    conversation per window."""
    if overflow not in OVERFLOW:
        raise ConfigError(f"overflow={overflow!r}: use one of {', '.join(OVERFLOW)}")
    if packing not in PACKING:
        raise ConfigError(f"packing={packing!r}: use one of {', '.join(PACKING)}")
    stats = stats if stats is not None else PackingStats()
    rows: List[Encoded] = []
    used = 0
    for input_ids, labels in conversations:
        if len(input_ids) != len(labels):
            raise ValueError(f"input_ids ({len(input_ids)}) and labels ({len(labels)}) differ in length")
        if not input_ids:
            continue
        stats.conversations += 1
        if len(input_ids) > seq_len:
            if overflow == "drop":
                stats.dropped += 1
                continue
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                stats.dropped += 1
                continue
            stats.truncated += 1
        if rows and (packing == "padded" or used + len(input_ids) > seq_len):
            yield _window(rows, seq_len, pad_id, stats)
            rows, used = [], 0
        rows.append((input_ids, labels))
        used += len(input_ids)
    if rows:
        yield _window(rows, seq_len, pad_id, stats)


def collate(windows: Sequence[Window]) -> SFTBatch:
    """Stack windows into one batch."""
    return SFTBatch(
        *(torch.tensor([getattr(w, name) for w in windows], dtype=torch.long) for name in WINDOW_FIELDS)
    )


def _window(rows: List[Encoded], seq_len: int, pad_id: int, stats: PackingStats) -> Window:
    w = Window([], [], [], [])
    for segment, (input_ids, labels) in enumerate(rows, 1):
        # The first token of a conversation is never a target: the token before it belongs to
        # another conversation (this matters with train_on="all").
        w.input_ids += input_ids
        w.labels += [IGNORE_INDEX] + labels[1:]
        w.position_ids += range(len(input_ids))
        w.segment_ids += [segment] * len(input_ids)
    real = len(w.input_ids)
    stats.windows += 1
    stats.window_tokens += seq_len
    stats.real_tokens += real
    stats.loss_tokens += sum(label != IGNORE_INDEX for label in w.labels)
    pad = seq_len - real
    w.input_ids += [pad_id] * pad
    w.labels += [IGNORE_INDEX] * pad
    w.position_ids += [0] * pad
    w.segment_ids += [0] * pad
    return w
