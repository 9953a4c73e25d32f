"""Decoding speed of our GGUF export in llama.cpp against our `generate` and transformers.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_gguf.py --tokenizer runs/demo/checkpoints/step_300/tokenizer.model

Shape: the llama2c_15m preset (dim 288, 6 layers, 6 heads, tied embeddings) with --vocab, random
initialisation, batch 1. The same weights run as: llama.cpp (llama-cpp-python) from the float32
and the q8_0 GGUF files, ours (`tinyllama.generate`) with float32 and with int8 weights
(`weights="int8"`), and transformers (float32, loaded from our Hugging Face export). Each
decodes greedily 256 new tokens after an 8-token prompt (no EOS stop); tokens / second, the
median of --rounds alternating rounds after a warm-up, each started 0.2 s after the previous
one ended (the worker threads of llama.cpp and of torch spin-wait after a call; with two cores
they would otherwise slow whichever library runs next). For each thread count of --threads (all
in one run) every library gets that many threads (torch, NumPy's BLAS through threadpoolctl,
llama.cpp's n_threads). The script also reports whether llama.cpp's float32 greedy tokens equal
ours, and how far q8_0's and our int8's agree with our float32 ones.

Then, at the largest thread count: total tokens / second of ours decoding B rows at once (B = 1,
4, 16, 64; sampled at temperature 0.8, top_p 0.95, 128 new tokens after 8-token prompts), float32
and int8, with the KV cache's memory; and, with --run (a trained run such as runs/demo), how often
that model's greedy tokens with int8 weights equal float32's on 20 held-out prompts x 32 tokens.
"""

from __future__ import annotations

import argparse
import functools
import itertools
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

from tinyllama.checkpoint import build_model, load_checkpoint
from tinyllama.data.sources import iter_documents
from tinyllama.export import export_hf
from tinyllama.export_gguf import export_gguf
from tinyllama.fast_decode import FastDecoder
from tinyllama.generate import generate
from tinyllama.model import KVCache, LlamaConfig, LlamaForCausalLM
from tinyllama.tokenizer import Tokenizer

PRESET = Path(__file__).resolve().parent.parent / "configs" / "model" / "llama2c_15m.yaml"
NEW_TOKENS, PROMPT = 256, 8
SETTLE_S = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokenizer", required=True, help="a SentencePiece .model (its vocabulary goes into the GGUF)"
    )
    parser.add_argument("--vocab", type=int, default=4096, help="model vocab_size (>= the tokenizer's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--run", help="a trained run or checkpoint: int8 greedy agreement on its model")
    args = parser.parse_args()
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
    gguf = {
        dtype: str(export_gguf(ours, tmp / dtype, tokenizer_path=tok.model_path, dtype=dtype))
        for dtype in ("float32", "q8_0")
    }

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

    print(
        f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; vocab {args.vocab}, {args.rounds} rounds"
    )
    print("| threads | decoder | tok/s | vs llama.cpp f32 | vs llama.cpp q8_0 |\n|---|---|---|---|---|")
    agreement = ""
    for threads in args.threads:
        torch.set_num_threads(threads)
        threadpool_limits(threads)
        llms = {
            dtype: llama_cpp.Llama(
                model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False
            )
            for dtype, path in gguf.items()
        }

        def llama_cpp_decode(llm) -> List[int]:
            out = []
            for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
                out.append(token)
                if len(out) == NEW_TOKENS:
                    return out
            return out

        runs: Dict[str, Callable[[], object]] = {
            "llama.cpp f32": functools.partial(llama_cpp_decode, llms["float32"]),
            "llama.cpp q8_0": functools.partial(llama_cpp_decode, llms["q8_0"]),
            "ours f32": lambda: generate(ours, ids, NEW_TOKENS, temperature=0.0),
            "ours int8": lambda: generate(ours, ids, NEW_TOKENS, temperature=0.0, weights="int8"),
            "transformers f32": hf_decode,
        }
        if not agreement:
            f32 = runs["ours f32"]()[0, len(prompt) :].tolist()
            int8 = runs["ours int8"]()[0, len(prompt) :].tolist()
            agreement = (
                f"llama.cpp f32 greedy tokens equal ours: {runs['llama.cpp f32']() == f32}; "
                f"q8_0 agrees with our f32 on the first {_agree(runs['llama.cpp q8_0'](), f32)}/{NEW_TOKENS} "
                f"greedy tokens, our int8 on the first {_agree(int8, f32)}/{NEW_TOKENS} (random weights)"
            )
        for fn in runs.values():
            fn()
        times: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                # The previous library's worker threads spin-wait for a while after it returns
                # (llama.cpp's pool, torch's OpenMP); let them go idle so nobody runs against them.
                time.sleep(SETTLE_S)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        rates = {name: NEW_TOKENS / statistics.median(t) for name, t in times.items()}
        for name, rate in rates.items():
            print(
                f"| {threads} | {name} | {rate:.0f} | {rate / rates['llama.cpp f32']:.2f}x "
                f"| {rate / rates['llama.cpp q8_0']:.2f}x |",
                flush=True,
            )
        for llm in llms.values():
            llm.close()
    print(agreement)
    print()
    torch.set_num_threads(max(args.threads))
    threadpool_limits(max(args.threads))
    batched(ours, args.batches, args.rounds)
    if args.run:
        print()
        int8_agreement(args.run)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    shutil.rmtree(tmp)


def batched(model: LlamaForCausalLM, batches: List[int], rounds: int) -> None:
    """Total sampled tokens / second at each batch size, float32 and int8, and the cache's bytes."""
    cfg = model.config
    new, prompt = 128, 8
    print(
        f"batched sampling, {torch.get_num_threads()} thread(s): {prompt}-token prompts, {new} new tokens, "
        "temperature 0.8, top_p 0.95"
    )
    print(
        "| batch | f32 tok/s | vs batch 1 | int8 tok/s | vs batch 1 | KV cache (float32) |\n|---|---|---|---|---|---|"
    )
    base: Dict[str, float] = {}
    for B in batches:
        ids = torch.randint(3, cfg.vocab_size, (B, prompt), generator=torch.Generator().manual_seed(B))
        rates = {}
        for weights in ("float32", "int8"):
            run = functools.partial(
                generate, model, ids, new, temperature=0.8, top_p=0.95, seed=0, weights=weights
            )
            run()
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            rates[weights] = B * new / statistics.median(times)
            base.setdefault(weights, rates[weights])
        cache = KVCache(cfg, B, prompt + new, dtype=torch.float32)
        cache_mb = sum(t.numel() * t.element_size() for t in cache.keys + cache.values) / 2**20
        print(
            f"| {B} | {rates['float32']:.0f} | {rates['float32'] / base['float32']:.1f}x "
            f"| {rates['int8']:.0f} | {rates['int8'] / base['int8']:.1f}x | {cache_mb:.1f} MiB |",
            flush=True,
        )
    sizes = {w: FastDecoder.for_model(model, w).nbytes / 2**20 for w in ("float32", "int8")}
    print(f"packed decoding matrices: float32 {sizes['float32']:.1f} MiB, int8 {sizes['int8']:.1f} MiB")


def int8_agreement(run: str, prompts: int = 20, new: int = 32) -> None:
    """Greedy tokens of a trained model with int8 weights against float32, on held-out prompts
    (the first words of the run's validation documents)."""
    ckpt = load_checkpoint(run, train_state=False)
    model = build_model(ckpt)
    tok = Tokenizer(str(ckpt.path / "tokenizer.model"))
    docs = itertools.islice((d for d in iter_documents(ckpt.job.data, "val") if len(d.split()) > 8), prompts)
    same_prompts = same_tokens = total = 0
    for doc in docs:
        ids = torch.tensor([tok.encode(" ".join(doc.split()[:6]), bos=True)])
        f32 = generate(model, ids, new, temperature=0.0)[0, ids.shape[1] :]
        int8 = generate(model, ids, new, temperature=0.0, weights="int8")[0, ids.shape[1] :]
        same_prompts += torch.equal(f32, int8)
        same_tokens += _agree(int8.tolist(), f32.tolist())
        total += 1
    print(
        f"int8 vs float32 greedy on {ckpt.path} ({total} held-out prompts x {new} tokens): "
        f"{same_prompts}/{total} prompts identical, {same_tokens}/{total * new} tokens equal before "
        f"the first difference ({same_tokens / (total * new):.1%})"
    )


def _agree(a: List[int], b: List[int]) -> int:
    """How many leading tokens two greedy sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    main()
