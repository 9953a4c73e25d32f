"""The evaluation loop: mean loss per target token over batches, and what it needs.

    evaluate_loss(model, batches, device)      training's validation, the evaluate stage, chat runs
    TokenBytes(tokenizer)                      UTF-8 bytes per target token, for bits per byte

The evaluate stage (tinyllama/evaluate.py) and the evaluation of conversations
(tinyllama/chat_eval.py) both build on this module.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

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
