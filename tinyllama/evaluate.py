"""Evaluation: loss, perplexity, bits per byte and loss by position of a causal LM.

    evaluate_loss(model, batches, device)      the loop (training's validation and this stage)
    TokenBytes(tokenizer)                      UTF-8 bytes per target token, for bits per byte
    text_batches(tokenizer, docs, B, T)        (x, y) windows of any text, packed in memory
    run_evaluation(job)                        the stage: checkpoint -> JSON, table and plot

The stage loads its checkpoint with `tinyllama.checkpoint.load_for_inference`, as sampling and
export do, and cuts windows with `tinyllama.data.loader.window_batches`, as training's validation
does; it needs nothing of the training package.

Bits per byte = total nats / (ln 2 x UTF-8 bytes of the evaluated text): unlike loss per token,
it does not depend on the tokenizer, so models with different vocabularies compare fairly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tinyllama.checkpoint import load_for_inference
from tinyllama.data import ensure_packed, iter_documents
from tinyllama.data.loader import eval_batches, window_batches
from tinyllama.errors import DataError
from tinyllama.model import causal_lm_loss

Batch = Tuple[torch.Tensor, torch.Tensor]


class TokenBytes:
    """How many UTF-8 bytes of text each target token stands for.

    A piece's bytes are those it decodes to ("▁" is a space), a byte-fallback piece <0xNN> is 1,
    control pieces (<s>, </s>) are 0. SentencePiece puts a dummy "▁" before every encoded text
    that decoding removes, so the first token of a document (its input is <s>) gets one byte
    less. With the identity normalisation our tokenizers use, a document's tokens then sum to
    exactly len(text.encode("utf-8")), and any window of tokens counts exactly its own bytes.
    """

    def __init__(self, tokenizer) -> None:
        sp = tokenizer.sp
        sizes = []
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                sizes.append(1)
            elif sp.is_control(i) or sp.is_unknown(i):
                sizes.append(0)
            else:
                sizes.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
        self.table = torch.tensor(sizes, dtype=torch.int64)  # (V,)
        self.bos_id = tokenizer.bos_id
        self.dummy_prefix = sp.encode_as_pieces("a")[0].startswith("\u2581")

    def count(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bytes of the targets y (B, T) whose inputs are x (B, T); -100 targets count 0. -> int64 scalar."""
        if self.table.device != y.device:
            self.table = self.table.to(y.device)  # once, not per batch
        valid = y != -100
        sizes = self.table[y.clamp(min=0)] * valid  # (B, T) bytes per target
        n = sizes.sum()
        if self.dummy_prefix:
            n = n - ((x == self.bos_id) & (sizes > 0)).sum()
        return n


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device | str,
    autocast: Optional[Callable[[], ContextManager]] = None,
    token_bytes: Optional[TokenBytes] = None,
    by_position: bool = False,
) -> Dict[str, object]:
    """Mean cross-entropy per target token over `batches`, and its perplexity.

    batches: (x, y) int64 pairs of shape (B, T), y already aligned with x (the next tokens),
    or dicts of model keyword arguments with input_ids (x) and shift_labels (y);
    label -100 in y is ignored. The mean is weighted by tokens, so a short last batch counts
    for what it holds. Under torch.distributed every rank passes its own share of the batches
    and all ranks get the global figures.
    autocast: optional factory of the autocast context the model trains under.
    token_bytes: adds "bytes" and "bits_per_byte". by_position: adds "loss_by_position", the
    mean loss at each position t of the window (list of T floats).
    Returns dict(loss, perplexity, tokens, ...).
    """
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext
    # Sums in float64: thousands of batches of per-token losses lose precision in float32.
    sums = {
        "nats": torch.zeros((), dtype=torch.float64, device=device),
        "tokens": torch.zeros((), dtype=torch.float64, device=device),
        "bytes": torch.zeros((), dtype=torch.float64, device=device),
    }
    position_nats = position_tokens = None
    for batch in batches:
        # (x, y), or the model's keyword arguments (packed conversations add position_ids and
        # attention_mask): input_ids is x, shift_labels is y.
        kwargs = (
            dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch[0], "shift_labels": batch[1]}
        )
        kwargs = {k: v.to(device, non_blocking=True) for k, v in kwargs.items()}
        x, y = kwargs.pop("input_ids"), kwargs.pop("shift_labels")
        with autocast():
            logits = model(x, **kwargs).logits  # (B, T, V)
        nats = causal_lm_loss(logits, y, reduction="none")  # (B, T), 0 where ignored
        valid = y != -100
        sums["nats"] += nats.sum(dtype=torch.float64)
        sums["tokens"] += valid.sum()
        if token_bytes is not None:
            sums["bytes"] += token_bytes.count(x, y)
        if by_position:
            if position_nats is None:
                position_nats = torch.zeros(y.shape[1], dtype=torch.float64, device=device)
                position_tokens = torch.zeros_like(position_nats)
            position_nats += nats.sum(0, dtype=torch.float64)
            position_tokens += valid.sum(0)
    if dist.is_available() and dist.is_initialized():
        for t in list(sums.values()) + ([position_nats, position_tokens] if by_position else []):
            dist.all_reduce(t)
    model.train(was_training)
    if sums["tokens"].item() == 0:
        raise ValueError("evaluate_loss: no target tokens in the batches (empty validation split?)")
    loss = (sums["nats"] / sums["tokens"]).item()
    out: Dict[str, object] = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": int(sums["tokens"].item()),
    }
    if token_bytes is not None:
        out["bytes"] = int(sums["bytes"].item())
        out["bits_per_byte"] = sums["nats"].item() / (math.log(2) * max(out["bytes"], 1))
    if by_position:
        out["loss_by_position"] = (position_nats / position_tokens.clamp(min=1)).tolist()
    return out


def text_batches(
    tokenizer, docs: Iterable[str], batch_size: int, seq_len: int, max_batches: Optional[int] = None
) -> Iterator[Batch]:
    """(x, y) batches over documents tokenized in memory, laid out as packing does on disk
    (<s> doc </s> <s> doc </s> ...) and cut by `window_batches` as packed splits are: windows of
    seq_len + 1 tokens, the incomplete last one dropped."""
    ids = np.fromiter((i for doc in docs for i in tokenizer.encode(doc, bos=True, eos=True)), dtype=np.int64)
    window = seq_len + 1
    n_windows = len(ids) // window
    if n_windows == 0:
        raise DataError(
            f"the evaluation text has {len(ids)} tokens, fewer than one window of "
            f"seq_len + 1 = {window}: give more text or lower evaluate.seq_len"
        )
    yield from window_batches(
        lambda start, length: ids[start : start + length], seq_len, batch_size, range(n_windows), max_batches
    )


def run_evaluation(job) -> Dict[str, object]:
    """The evaluation stage: load the checkpoint (job.checkpoint_path or run.dir), evaluate it on
    job.evaluate's text, print the figures and the loss-by-position table, and write them to
    <run>/eval/<name>.json (+ .tsv table, + .png plot). Returns the results."""
    ev = job.evaluate
    ckpt, model, tokenizer, device = load_for_inference(job, ev.rope_type, ev.rope_factor)
    seq_len = ev.seq_len or ckpt.job.train.seq_len
    batches, source = _batches(job, ckpt, tokenizer, seq_len)
    result = evaluate_loss(model, batches, device, token_bytes=TokenBytes(tokenizer), by_position=True)
    by_position = result.pop("loss_by_position")
    rope = ckpt.model_config.rope_scaling
    result = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "source": source,
        "seq_len": seq_len,
        "rope_scaling": dict(rope) if rope else None,
        **result,
        "loss_by_position": by_position,
    }
    name = f"step_{ckpt.step}-{source.replace('/', '_')}-T{seq_len}"
    if rope:
        name += f"-{rope['rope_type']}{rope.get('factor', 1):g}"
    out = ckpt.path.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = loss_by_position_table(by_position)
    (out / f"{name}.tsv").write_text(table, encoding="utf-8")
    if ev.plot:
        plot_loss_by_position(
            by_position,
            out / f"{name}.png",
            f"{ckpt.path.parent.parent.name} {name}",
            trained_len=ckpt.job.train.seq_len,
        )
    print(
        f"{source} ({result['tokens']} tokens, {result['bytes']} bytes, seq_len {seq_len}): "
        f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
        f"bits/byte {result['bits_per_byte']:.4f}\nloss by position:\n{table}written {out / name}.json"
    )
    return result


def _batches(job, ckpt, tokenizer, seq_len: int) -> Tuple[Iterator[Batch], str]:
    """The evaluated windows and a name for their source."""
    ev = job.evaluate
    if ev.files:  # the user's own files, whole (no held-out fraction)
        data = dataclasses.replace(
            job.data, source="text_files", train_files=list(ev.files), val_files=list(ev.files)
        )
        docs = iter_documents(data, "val")
        return text_batches(tokenizer, docs, ev.batch_size, seq_len, ev.max_batches), Path(ev.files[0]).stem
    if ev.source == "data":
        docs = iter_documents(job.data, ev.split)
        source = f"{job.data.name}/{ev.split}"
        return text_batches(tokenizer, docs, ev.batch_size, seq_len, ev.max_batches), source
    packed = ensure_packed(ckpt.job.data, tokenizer)  # the run's data: reused, or packed again if gone
    return eval_batches(packed, ev.split, ev.batch_size, seq_len, ev.max_batches), ev.split


def loss_by_position_table(losses: List[float], rows: int = 16) -> str:
    """Tab-separated "positions  mean loss" lines: every position up to `rows`, else `rows` equal
    ranges (the mean over each range's positions)."""
    T = len(losses)
    edges = np.linspace(0, T, min(rows, T) + 1).astype(int)
    lines = ["position\tloss"]
    for lo, hi in zip(edges[:-1], edges[1:]):
        label = f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
        lines.append(f"{label}\t{float(np.mean(losses[lo:hi])):.4f}")
    return "\n".join(lines) + "\n"


def plot_loss_by_position(
    losses: List[float], path: Path, title: str = "", trained_len: Optional[int] = None
) -> None:
    """Line plot of the mean loss at each position of the window (PNG, headless), with a marker
    at the training length when the window is longer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(losses)), losses, linewidth=1)
    if trained_len is not None and trained_len < len(losses):
        ax.axvline(trained_len, color="gray", linestyle="--", linewidth=1, label="training length")
        ax.legend()
    ax.set_xlabel("position in window (tokens)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
