"""Generation speed on CPU: ours (tinyllama.generate) against transformers' generate.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_generate.py
    flock /tmp/bench.lock .venv/bin/python scripts/bench_generate.py --vocab 4096 --rounds 5 --threads 2

Shape: the llama2c_15m preset (dim 288, 6 layers, 6 heads, tied embeddings), float32, batch 1,
for each vocabulary size given. transformers' model is loaded from our Hugging Face export of
the same weights, so both run identical math; the script checks they produce the same tokens.

- decode: greedy, 256 new tokens after an 8-token prompt (no EOS stop), tokens / second; ours
  as `generate` runs by default (tinyllama/fast_decode.py: the model's math on weights packed
  for decoding, in its compiled step where this machine builds it) and with `fast=False` (the model's own forward at every step);
- prefill: one 256-token prompt and its first new token, prompt tokens / second;
- matvec bounds: the matrix-vector products of one decoding step alone, as tokens / second:
  torch's, in nn.Linear's (C_out, C_in) layout, and NumPy's in the packed (C_in, C_out) layout
  of fast_decode's NumPy step. At batch 1 decoding streams every weight from memory once per token, so
  these bound what the two implementations reach here.

--threads applies to both torch and NumPy's BLAS (threadpoolctl), for both libraries' runs.

Each figure is the median of --rounds timed rounds (after one warm-up); the two libraries run in
alternating rounds, so a load spike from another process hits both alike.
Target: ours >= 3x transformers' decode rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits

from tinyllama.export import export_hf
from tinyllama.fast_decode import FastDecoder, threads_shared
from tinyllama.generate import generate
from tinyllama.model import LlamaConfig, LlamaForCausalLM

PRESET = Path(__file__).resolve().parent.parent / "configs" / "model" / "llama2c_15m.yaml"
NEW_TOKENS, DECODE_PROMPT, PREFILL_PROMPT = 256, 8, 256


def load_config(vocab_size: int) -> LlamaConfig:
    """The llama2c_15m preset with this vocabulary; context 512 so prompt + 256 new tokens fit."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(LlamaConfig),
        OmegaConf.load(PRESET),
        {"vocab_size": vocab_size, "max_position_embeddings": 512},
    )
    return OmegaConf.to_object(cfg)


def timed(fn: Callable[[], object], rounds: List[float]) -> None:
    start = time.perf_counter()
    fn()
    rounds.append(time.perf_counter() - start)


def bench_vocab(vocab_size: int, n_rounds: int) -> Dict[str, float]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    ours = LlamaForCausalLM(load_config(vocab_size)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs = AutoModelForCausalLM.from_pretrained(
            export_hf(ours, Path(tmp) / "hf"), dtype=torch.float32
        ).eval()
    g = torch.Generator().manual_seed(1)
    short = torch.randint(3, vocab_size, (1, DECODE_PROMPT), generator=g)
    long = torch.randint(3, vocab_size, (1, PREFILL_PROMPT), generator=g)
    hf_kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def hf_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return theirs.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **hf_kwargs
            )

    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]

    def matvecs() -> None:
        with torch.inference_mode():
            for m, x in zip(linears, inputs):
                m(x)

    packed = FastDecoder(ours, backend="numpy")
    packed_weights = [
        m for layer in packed.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)
    ]
    packed_weights.append(packed.lm_head)
    packed_inputs = [np.ones((1, m.in_features), np.float32) for m in packed_weights]

    def packed_matvecs() -> None:
        shared = threads_shared()
        for m, x in zip(packed_weights, packed_inputs):
            m(x, shared)

    runs = {
        "matvecs": matvecs,
        "packed_matvecs": packed_matvecs,
        "ours_decode": lambda: generate(ours, short, NEW_TOKENS, temperature=0.0),
        "ours_model_decode": lambda: generate(ours, short, NEW_TOKENS, temperature=0.0, fast=False),
        "hf_decode": lambda: hf_generate(short, NEW_TOKENS),
        "ours_prefill": lambda: generate(ours, long, 1, temperature=0.0),
        "hf_prefill": lambda: hf_generate(long, 1),
    }
    same = torch.equal(runs["ours_decode"](), runs["hf_decode"]())  # also the warm-up
    same = same and torch.equal(runs["ours_decode"](), runs["ours_model_decode"]())
    for fn in runs.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(n_rounds):
        for name, fn in runs.items():
            timed(fn, times[name])
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "ours_decode": NEW_TOKENS / med["ours_decode"],
        "hf_decode": NEW_TOKENS / med["hf_decode"],
        "ours_model_decode": NEW_TOKENS / med["ours_model_decode"],
        "packed_ceiling": 1 / med["packed_matvecs"],
        "ours_prefill": PREFILL_PROMPT / med["ours_prefill"],
        "hf_prefill": PREFILL_PROMPT / med["hf_prefill"],
        "same_tokens": same,
        "ceiling": 1 / med["matvecs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # NumPy's OpenBLAS too (and torch's OpenMP pool, again)
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        "| vocab | decode ours (tok/s) | ours, fast=False | decode transformers (tok/s) | ratio "
        "| prefill ours (tok/s) | prefill transformers (tok/s) | ratio | matvecs, Linear layout (tok/s) "
        "| matvecs, packed layout (tok/s) | same greedy tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        r = bench_vocab(vocab, args.rounds)
        print(
            f"| {vocab} | {r['ours_decode']:.0f} | {r['ours_model_decode']:.0f} | {r['hf_decode']:.0f} "
            f"| {r['ours_decode'] / r['hf_decode']:.2f}x | {r['ours_prefill']:.0f} | {r['hf_prefill']:.0f} "
            f"| {r['ours_prefill'] / r['hf_prefill']:.2f}x | {r['ceiling']:.0f} | {r['packed_ceiling']:.0f} "
            f"| {r['same_tokens']} |",
            flush=True,
        )
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
