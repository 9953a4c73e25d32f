"""Decoding speed of our GGUF export in llama.cpp against our `generate` and transformers.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_gguf.py --tokenizer runs/demo/checkpoints/step_300/tokenizer.model

Shape: the llama2c_15m preset (dim 288, 6 layers, 6 heads, tied embeddings) with --vocab, random
initialisation, batch 1. The same weights run as: llama.cpp (llama-cpp-python) from the float32
and the q8_0 GGUF files, ours (`tinyllama.generate`, float32) and transformers (float32, loaded
from our Hugging Face export). Each decodes greedily 256 new tokens after an 8-token prompt (no
EOS stop); tokens / second, the median of --rounds alternating rounds after a warm-up. Every
library gets --threads threads (torch, NumPy's BLAS through threadpoolctl, llama.cpp's n_threads).
The script also reports whether llama.cpp's float32 greedy tokens equal ours.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits

from tinyllama.export import export_hf
from tinyllama.export_gguf import export_gguf
from tinyllama.generate import generate
from tinyllama.model import LlamaConfig, LlamaForCausalLM
from tinyllama.tokenizer import Tokenizer

PRESET = Path(__file__).resolve().parent.parent / "configs" / "model" / "llama2c_15m.yaml"
NEW_TOKENS, PROMPT = 256, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokenizer", required=True, help="a SentencePiece .model (its vocabulary goes into the GGUF)"
    )
    parser.add_argument("--vocab", type=int, default=4096, help="model vocab_size (>= the tokenizer's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    import llama_cpp
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(LlamaConfig),
            OmegaConf.load(PRESET),
            {"vocab_size": args.vocab, "max_position_embeddings": 512},
        )
    )
    torch.manual_seed(0)
    ours = LlamaForCausalLM(cfg).eval()
    tok = Tokenizer(args.tokenizer)
    prompt = tok.encode("Once upon a time, there", bos=True)[:PROMPT]
    ids = torch.tensor([prompt])
    tmp = Path(tempfile.mkdtemp(prefix="bench_gguf-"))  # a few 10s of MB; llama.cpp maps the files
    theirs = AutoModelForCausalLM.from_pretrained(export_hf(ours, tmp / "hf"), dtype=torch.float32).eval()
    llms = {
        dtype: llama_cpp.Llama(
            model_path=str(export_gguf(ours, tmp / dtype, tokenizer_path=tok.model_path, dtype=dtype)),
            n_ctx=512,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
        )
        for dtype in ("float32", "q8_0")
    }

    def llama_cpp_decode(llm) -> List[int]:
        out = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if len(out) == NEW_TOKENS:
                return out
        return out

    def hf_decode() -> torch.Tensor:
        with torch.inference_mode():
            return theirs.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    runs: Dict[str, Callable[[], object]] = {
        "llama.cpp f32": lambda: llama_cpp_decode(llms["float32"]),
        "llama.cpp q8_0": lambda: llama_cpp_decode(llms["q8_0"]),
        "ours (generate, f32)": lambda: generate(ours, ids, NEW_TOKENS, temperature=0.0),
        "transformers (f32)": hf_decode,
    }
    ours_tokens = runs["ours (generate, f32)"]()[0, len(prompt) :].tolist()
    same_f32 = runs["llama.cpp f32"]() == ours_tokens
    q8 = runs["llama.cpp q8_0"]()
    q8_agree = next((i for i, (a, b) in enumerate(zip(q8, ours_tokens)) if a != b), NEW_TOKENS)
    for fn in runs.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(
        f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; vocab {args.vocab}, {args.threads} thread(s), {args.rounds} rounds; "
        f"load average {os.getloadavg()[0]:.2f} at the end"
    )
    print("| decoder | tok/s | vs transformers |\n|---|---|---|")
    rates = {name: NEW_TOKENS / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['transformers (f32)']:.2f}x |")
    print(
        f"llama.cpp f32 greedy tokens equal ours: {same_f32}; q8_0 agrees on the first "
        f"{q8_agree}/{NEW_TOKENS} greedy tokens"
    )
    for llm in llms.values():
        llm.close()
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
