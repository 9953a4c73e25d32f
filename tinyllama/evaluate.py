"""Evaluation: loss, perplexity, bits per byte and loss by position of a causal LM.

    evaluate_loss(model, batches, device)      the loop (training's validation and this stage)
    TokenBytes(tokenizer)                      UTF-8 bytes per target token, for bits per byte
    text_batches(tokenizer, docs, B, T)        (x, y) windows of any text, packed in memory
    run_evaluation(job)                        the stage: checkpoint -> JSON, table and plot
    assistant_loss(model, tokenizer, convs)    chat runs: loss on the assistant's tokens only
    answer_accuracy(model, tokenizer, convs)   chat runs: greedy replies vs the short answers

On a chat run (its data is conversations, tinyllama.config.is_chat), or with evaluate.source=data
and a chat `data` group (e.g. data=synthetic_chat, to measure a base run on the same questions),
the stage evaluates the held-out conversations instead of text windows: the loss on assistant
tokens and, for the built-in corpus, `answer_accuracy`.

The stage loads its checkpoint with `tinyllama.checkpoint.load_for_inference`, as sampling and
export do, and cuts windows with `tinyllama.data.loader.window_batches`, as training's validation
does; it needs nothing of the training package.

Bits per byte = total nats / (ln 2 x UTF-8 bytes of the evaluated text): unlike loss per token,
it does not depend on the tokenizer, so models with different vocabularies compare fairly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tinyllama.chat import greedy_replies
from tinyllama.chat_template import encode_conversation
from tinyllama.checkpoint import load_for_inference
from tinyllama.config import DataConfig, is_chat
from tinyllama.data import ensure_packed, iter_documents
from tinyllama.data.conversations import iter_conversations
from tinyllama.data.loader import eval_batches, window_batches
from tinyllama.data.sft_batches import PackingStats, collate, pack_windows, padding_id
from tinyllama.data.synthetic_chat import answer_matches
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


def run_chat_evaluation(job, ckpt, model, tokenizer, data: DataConfig, seq_len: int) -> Dict[str, object]:
    """The evaluation stage on conversations: the loss on assistant tokens of `data`'s
    evaluate.split and, for the built-in corpus, answer_accuracy over up to evaluate.max_answers
    of its questions; printed and written to <run>/eval/<name>.json. Returns the results."""
    ev = job.evaluate
    conversations = list(iter_conversations(data, ev.split))
    loss = assistant_loss(model, tokenizer, conversations, ev.batch_size, seq_len, ev.max_batches)
    result: Dict[str, object] = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "source": f"{data.name}/{ev.split}",
        "seq_len": seq_len,
        "conversations": len(conversations),
        **loss,
    }
    if data.source == "synthetic_chat":  # only the built-in corpus has checkable short answers
        result.update(answer_accuracy(model, tokenizer, conversations, ev.max_answers, ev.batch_size))
    name = f"step_{ckpt.step}-{data.name}_{ev.split}-chat"
    out = ckpt.path.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    accuracy = (
        f"  answer_accuracy {result['answer_accuracy']:.3f} ({result['answer_count']} questions)"
        if "answer_accuracy" in result
        else ""
    )
    print(
        f"{result['source']} ({len(conversations)} conversations, {loss['assistant_tokens']} assistant "
        f"tokens): assistant_loss {loss['assistant_loss']:.4f}{accuracy}\nwritten {out / name}.json"
    )
    return result


def assistant_loss(
    model: nn.Module,
    tokenizer,
    conversations: Iterable[Dict[str, object]],
    batch_size: int = 8,
    seq_len: Optional[int] = None,
    max_batches: Optional[int] = None,
) -> Dict[str, object]:
    """Mean loss per assistant token (the tokens fine-tuning trains on: the replies and their
    end-of-turn) over `conversations` ({"messages": [...]} records), packed into windows of
    seq_len tokens (default: the model's context) exactly as fine-tuning packs them (a
    conversation's logits in a window equal its own). Conversations longer than a window are cut
    (or dropped when nothing that carries loss is left), and counted.
    Returns dict(assistant_loss, assistant_tokens, truncated, dropped)."""
    device = next(model.parameters()).device
    stats = PackingStats()
    encoded = (encode_conversation(tokenizer, c["messages"], train_on="assistant") for c in conversations)
    windows = pack_windows(
        encoded, seq_len or model.config.max_position_embeddings, padding_id(tokenizer), "truncate", stats
    )

    def batches() -> Iterator[Dict[str, torch.Tensor]]:
        chunks = iter(lambda: list(itertools.islice(windows, batch_size)), [])
        for b, chunk in enumerate(chunks):
            if max_batches is not None and b >= max_batches:
                return
            yield collate(chunk).inputs().inputs

    result = evaluate_loss(model, batches(), device)
    return {
        "assistant_loss": result["loss"],
        "assistant_tokens": result["tokens"],
        "truncated": stats.truncated,
        "dropped": stats.dropped,
    }


def answer_accuracy(
    model: nn.Module,
    tokenizer,
    conversations: Iterable[Dict[str, object]],
    max_answers: Optional[int] = None,
    batch_size: int = 8,
    examples: int = 5,
) -> Dict[str, object]:
    """Share of questions answered exactly: for each conversation with an "answer" (the built-in
    corpus's short reply to its last user turn; the first max_answers of them, None: all), the
    greedy reply to the messages before its last assistant turn, compared by `answer_matches`.

    A reply is given a few tokens more than its answer needs: a longer one cannot match.
    Returns dict(answer_accuracy, answer_count, answer_examples: the first `examples`
    {"answer", "reply"} pairs). Usable on any model whose tokenizer has the chat pieces (a base
    run too, to compare it with its fine-tuned run on the same questions)."""
    asked = [c for c in conversations if c.get("answer") is not None]
    asked = asked[:max_answers] if max_answers is not None else asked
    if not asked:
        raise DataError("answer_accuracy: none of the conversations has a short answer to check")
    prompts = []
    for c in asked:
        messages = list(c["messages"])
        if messages[-1]["role"] != "assistant":
            raise DataError(f"a conversation with an answer must end with its assistant turn: {messages[-1]}")
        prompts.append(messages[:-1])
    limits = [len(tokenizer.encode(c["answer"])) + 4 for c in asked]  # + end-of-turn and slack
    replies = greedy_replies(model, tokenizer, prompts, limits, batch_size)
    correct = sum(answer_matches(r, c["answer"]) for r, c in zip(replies, asked))
    return {
        "answer_accuracy": correct / len(asked),
        "answer_count": len(asked),
        "answer_examples": [{"answer": c["answer"], "reply": r} for c, r in zip(asked[:examples], replies)],
    }


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
