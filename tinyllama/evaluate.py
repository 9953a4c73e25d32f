"""Evaluation: loss, perplexity, bits per byte and loss by position of a causal LM.

    evaluate_loss(model, batches, device)      the loop (training's validation and this stage)
    TokenBytes(tokenizer)                      UTF-8 bytes per target token, for bits per byte
    text_batches(tokenizer, docs, B, T)        (x, y) windows of any text, packed in memory
    run_evaluation(job)                        the stage: checkpoint -> JSON, table and plot

On a chat run (its data is conversations, tinyllama.config.is_chat), or with evaluate.source=data
and a chat `data` group (e.g. data=synthetic_chat, to measure a base run on the same questions),
the stage evaluates the held-out conversations instead of text windows (tinyllama/chat_eval.py):
the loss on assistant tokens and, for the built-in corpus, `answer_accuracy` and pass@k.

The stage loads its checkpoint with `tinyllama.checkpoint.load_for_inference`, as sampling and
export do, and cuts windows with `tinyllama.data.loader.window_batches`, as training's validation
does; it needs nothing of the training package.

Bits per byte = total nats / (ln 2 x UTF-8 bytes of the evaluated text): unlike loss per token,
it does not depend on the tokenizer, so models with different vocabularies compare fairly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from tinyllama.chat_eval import run_chat_evaluation
from tinyllama.checkpoint import load_for_inference
from tinyllama.config import DataConfig, is_chat
from tinyllama.data import ensure_packed, iter_documents
from tinyllama.data.loader import eval_batches, window_batches
from tinyllama.errors import DataError
from tinyllama.losses import Batch, TokenBytes, evaluate_loss


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
    chat_data = _chat_data(job, ckpt)
    if chat_data is not None:
        return run_chat_evaluation(job, ckpt, model, tokenizer, chat_data, seq_len)
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


def _chat_data(job, ckpt) -> Optional[DataConfig]:
    """The conversations to evaluate on, or None for text: the run's own data when it is chat
    (evaluate.source=run), the command line's `data` when that is chat (evaluate.source=data)."""
    ev = job.evaluate
    if ev.files:
        return None
    data = job.data if ev.source == "data" else ckpt.job.data
    return data if is_chat(data) else None


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
