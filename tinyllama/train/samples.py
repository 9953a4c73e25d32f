"""Text samples at the end of training, written to <run>/samples.txt.

Pretraining: continuations of the prompts the sample stage reads (`tinyllama.sample.prompts_of`)
from `tinyllama.generate.generate`, all samples of a prompt in one batch. Fine-tuning: the
greedy replies to held-out conversations (`tinyllama.chat.greedy_replies`, the replies
`scripts/chat.py` gives), each next to the reply the data holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, List

import torch

from tinyllama.chat import greedy_replies
from tinyllama.chat_template import apply_chat_template
from tinyllama.config import SampleConfig
from tinyllama.errors import DataError
from tinyllama.generate import generate
from tinyllama.sample import prompts_of


def _write(texts: List[str], path: Path, echo: Callable[[str], None]) -> None:
    """samples.txt: the texts separated by `---` lines, also printed."""
    body = "\n\n---\n\n".join(texts) + "\n"
    path.write_text(body, encoding="utf-8")
    echo(f"samples ({path}):\n{body}")


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
    _write(texts, path, echo)


@torch.no_grad()
def write_chat_samples(
    model: torch.nn.Module,
    tokenizer,
    cfg: SampleConfig,
    conversations: Iterable[Dict[str, object]],
    context: int,
    path: Path,
    echo: Callable[[str], None],
) -> None:
    """The greedy replies to the first cfg.num_samples of `conversations` ({"messages": [...]})
    whose prompt fits in `context` tokens (the run's train.seq_len), each prompted with every
    message before its last assistant turn and written with that turn as the reply expected;
    none when num_samples is 0. A reply gets up to cfg.max_new_tokens, and no more than the
    context leaves. Greedy, so the sampling settings do not apply: these are the replies the chat
    stage gives. Conversations that cannot be read again (a dataset no longer at hand) are
    reported and skipped: training is over and its checkpoint saved."""
    if cfg.num_samples == 0:
        return
    model.eval()
    prompts, expected, limits = [], [], []
    try:
        for c in conversations:
            messages = c["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            room = context - len(apply_chat_template(tokenizer, messages[:last], add_generation_prompt=True))
            if room < 2:  # no room for a reply and its end of turn
                continue
            prompts.append(messages[:last])
            expected.append(messages[last]["content"])
            limits.append(min(cfg.max_new_tokens, room))
            if len(prompts) == cfg.num_samples:
                break
    except (DataError, OSError) as e:
        echo(f"samples: skipped, the held-out conversations could not be read again ({e})")
        return
    if not prompts:
        echo(f"samples: no held-out conversation leaves room for a reply in {context} tokens")
        return
    replies = greedy_replies(model, tokenizer, prompts, limits)
    texts = []
    for messages, reply, answer in zip(prompts, replies, expected):
        turns = [f"{m['role']}: {m['content']}" for m in messages]
        texts.append("\n".join(turns + [f"assistant (greedy): {reply}", f"expected: {answer}"]))
    _write(texts, path, echo)
