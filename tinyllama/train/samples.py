"""Text samples at the end of training, written to <run>/samples.txt.

Pretraining: continuations of the prompts the sample stage reads (`tinyllama.sample.prompts_of`)
from `tinyllama.generate.generate`, all samples of a prompt in one batch. Fine-tuning: the
greedy replies to held-out conversations (`tinyllama.chat.greedy_replies`, the replies
`scripts/chat.py` gives), each next to the reply the data holds.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Dict, Iterable

import torch

from tinyllama.chat import greedy_replies
from tinyllama.config import SampleConfig
from tinyllama.generate import generate
from tinyllama.sample import prompts_of


@torch.no_grad()
def write_samples(
    model: torch.nn.Module,
    tokenizer,
    cfg: SampleConfig,
    seed: int,
    path: Path,
    device: torch.device,
    echo: Callable[[str], None],
) -> None:
    """cfg.num_samples continuations of each prompt, sampled with tinyllama.generate; none (and no
    samples.txt) when num_samples is 0."""
    if cfg.num_samples == 0:
        return
    model.eval()
    texts = []
    for prompt in prompts_of(cfg):
        ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device)
        out = generate(
            model,
            ids.repeat(cfg.num_samples, 1),
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty,
            eos_token_id=tokenizer.eos_id,
            seed=cfg.seed if cfg.seed is not None else seed,
        )
        for row in out.tolist():
            if tokenizer.eos_id in row[ids.shape[1] :]:
                row = row[: row.index(tokenizer.eos_id, ids.shape[1])]
            texts.append(tokenizer.decode(row))
    body = "\n\n---\n\n".join(texts) + "\n"
    path.write_text(body, encoding="utf-8")
    echo(f"samples ({path}):\n{body}")


@torch.no_grad()
def write_chat_samples(
    model: torch.nn.Module,
    tokenizer,
    cfg: SampleConfig,
    conversations: Iterable[Dict[str, object]],
    path: Path,
    echo: Callable[[str], None],
) -> None:
    """The greedy replies (up to cfg.max_new_tokens) to the first cfg.num_samples of
    `conversations` ({"messages": [...]} ending with an assistant turn), prompted with every
    message before that turn and written with the reply expected; none when num_samples is 0.
    Greedy, so the sampling settings do not apply: these are the replies the chat stage gives."""
    if cfg.num_samples == 0:
        return
    model.eval()
    chosen = [c["messages"] for c in itertools.islice(conversations, cfg.num_samples)]
    replies = greedy_replies(model, tokenizer, [m[:-1] for m in chosen], cfg.max_new_tokens)
    texts = []
    for messages, reply in zip(chosen, replies):
        turns = [f"{m['role']}: {m['content']}" for m in messages[:-1]]
        texts.append(
            "\n".join(turns + [f"assistant (greedy): {reply}", f"expected: {messages[-1]['content']}"])
        )
    body = "\n\n---\n\n".join(texts) + "\n"
    path.write_text(body, encoding="utf-8")
    echo(f"samples ({path}):\n{body}")
