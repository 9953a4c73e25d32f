"""Text samples at the end of training, written to <run>/samples.txt.

The prompts are those the sample stage reads (`tinyllama.sample.prompts_of`); the texts come
from `tinyllama.generate.generate`, all samples of a prompt in one batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

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
