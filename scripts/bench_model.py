"""Speed of one float32 training step (forward, backward, AdamW) on CPU, against transformers.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_model.py
    flock /tmp/bench.lock .venv/bin/python scripts/bench_model.py --profile   # where the time goes
    flock /tmp/bench.lock .venv/bin/python scripts/bench_model.py --compile   # + torch.compile variant

Shape: the llama2c_15m preset with a 4096 vocabulary, seq 256. Four variants run in one process
on the same weights, in alternating rounds (so a load spike from another process hits all of
them alike): ours and transformers' LlamaForCausalLM, each with sdpa and eager attention. The
same script measures the machine's float32 matmul throughput (best of 2048^3 matmuls, with the
train loop's own measured_cpu_flops) and reports each variant's achieved FLOP/s, counted as
LlamaForCausalLM.flops_per_token's training figure (6N + 12 L H D T), as a share of it.

Targets: ours/transformers time ratio >= 1.0, achieved >= 85% of matmul throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tinyllama.config import OptimConfig
from tinyllama.model import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from tinyllama.train.optim import build_optimizer
from tinyllama.train.precision import bf16_matmul_speedup, cpu_native_bf16, resolve_precision
from tinyllama.train.throughput import measured_cpu_flops

PRESET = Path(__file__).resolve().parent.parent / "configs" / "model" / "llama2c_15m.yaml"


def load_config(vocab_size: int, seq_len: int) -> LlamaConfig:
    """The llama2c_15m preset with the benchmark's vocabulary and context."""
    schema = OmegaConf.structured(LlamaConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.load(PRESET), {"vocab_size": vocab_size})
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq_len)
    return OmegaConf.to_object(cfg)


def hf_twin(config: LlamaConfig, ours: torch.nn.Module, attn: str) -> torch.nn.Module:
    """transformers.LlamaForCausalLM of the same shape holding a copy of our weights."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation=attn,
    )
    model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(ours.state_dict(), strict=True)
    return model


class Variant:
    """One model + its AdamW, timed one training step at a time."""

    def __init__(self, name: str, model: torch.nn.Module, precision: str = "fp32"):
        self.name, self.model = name, model.train()
        self.precision = resolve_precision(precision, torch.device("cpu"))
        # The train loop's AdamW (decay groups, CPU kernel choice), the same for every variant.
        self.optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        with self.precision.autocast():  # what train.precision does: bf16 products, fp32 weights
            loss = causal_lm_loss(self.model(x).logits, y)  # the train loop's loss, same for all
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def profile(
    variant: Variant,
    x: torch.Tensor,
    y: torch.Tensor,
    gemm_flops: float,
    step_flops: float,
    peak: float,
    rows: int = 25,
) -> None:
    """Print the top ops of one step, then the step split three ways: the matrix products of
    the projections and head (aten::mm, whose FLOPs are the 6N part), the attention kernels, and
    everything else; and the share of matmul throughput the step would reach if the attention
    kernels and everything else took no time at all."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    variant.step(x, y)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(x, y)
    print(f"\nprofile of one step of {variant.name} (self CPU time):")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    total = sum(e.self_cpu_time_total for e in averages) / 1e6
    mm = sum(e.self_cpu_time_total for e in averages if e.key in ("aten::mm", "aten::addmm")) / 1e6
    attention = sum(e.self_cpu_time_total for e in averages if "attention" in e.key) / 1e6
    print(
        f"step {total:.3f} s: matrix products {mm:.3f} s ({100 * mm / total:.0f}%, {gemm_flops / mm / 1e9:.1f} "
        f"GFLOP/s = {100 * gemm_flops / mm / peak:.0f}% of matmul), attention kernels {attention:.3f} s "
        f"({100 * attention / total:.0f}%), everything else {total - mm - attention:.3f} s "
        f"({100 * (total - mm - attention) / total:.0f}%)"
    )
    print(
        f"if attention and everything else took no time, the step (all its counted FLOPs in the "
        f"matrix products' time) would reach {100 * step_flops / mm / peak:.0f}% of matmul"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant, alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true", help="print the top ops of our sdpa step")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time our sdpa model under torch.compile (Inductor; compiles first, ~30 s)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also time our sdpa model (and its compiled twin) under bf16 autocast, as "
        "train.precision=bf16 runs it, and say what train.precision=auto picks",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.vocab_size, args.seq_len)
    ours = LlamaForCausalLM(config)
    variants = [Variant("tinyllama sdpa", ours), Variant("transformers sdpa", hf_twin(config, ours, "sdpa"))]
    ours_eager = LlamaForCausalLM(dataclasses.replace(config, attn_implementation="eager"))
    ours_eager.load_state_dict(ours.state_dict())
    variants += [
        Variant("tinyllama eager", ours_eager),
        Variant("transformers eager", hf_twin(config, ours, "eager")),
    ]
    if args.compile:  # what the train loop's train.compile=true does to the same model
        twin = LlamaForCausalLM(config)
        twin.load_state_dict(ours.state_dict())
        variants.append(Variant("tinyllama sdpa + torch.compile", torch.compile(twin)))
    if args.bf16:
        variants.append(Variant("tinyllama sdpa, bf16 autocast", ours, "bf16"))
        if args.compile:
            # The compiled twin again: torch.compile specialises it for autocast on first call.
            variants.append(
                Variant("tinyllama sdpa + torch.compile, bf16 autocast", variants[-2].model, "bf16")
            )

    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    y = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    load_before = os.getloadavg()
    for v in variants:
        for _ in range(args.warmup):
            v.step(x, y)
    peaks = []
    for _ in range(args.rounds):
        peaks.append(measured_cpu_flops(n=2048, repeats=5))  # each round: the machine's load changes under us
        for v in variants:
            v.times.append(v.step(x, y))
    load_after = os.getloadavg()
    peak = max(peaks)

    flops = ours.flops_per_token(args.seq_len)
    tokens = args.batch_size * args.seq_len
    print(
        f"shape: llama2c_15m, vocab {config.vocab_size}, batch {args.batch_size} x seq {args.seq_len}, "
        f"fp32, {args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"training FLOPs/token {flops['training'] / 1e6:.1f} M (6N = {6 * flops['n'] / 1e6:.1f} M, "
        f"attention {3 * flops['attention_forward'] / 1e6:.1f} M)"
    )
    print(
        f"matmul fp32 2048^3: best {peak / 1e9:.1f} GFLOP/s, median {statistics.median(peaks) / 1e9:.1f} "
        f"over {len(peaks)} rounds; load avg (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    # Other processes only ever add time, so the best step is the least disturbed estimate;
    # the median shows how much the load moved things.
    print("\n| variant | best step (s) | median (s) | tokens/s (best) | GFLOP/s (best) | % of matmul |")
    print("|---|---|---|---|---|---|")
    best = {}
    for v in variants:
        best[v.name] = min(v.times)
        achieved = flops["training"] * tokens / best[v.name]
        print(
            f"| {v.name} | {best[v.name]:.3f} | {statistics.median(v.times):.3f} | "
            f"{tokens / best[v.name]:,.0f} | {achieved / 1e9:.1f} | {100 * achieved / peak:.0f}% |"
        )
    for attn in ("sdpa", "eager"):
        print(
            f"ratio transformers/tinyllama time (best), {attn}: "
            f"{best[f'transformers {attn}'] / best[f'tinyllama {attn}']:.3f}"
        )
    print(f"tinyllama eager/sdpa time (best): {best['tinyllama eager'] / best['tinyllama sdpa']:.3f}")
    if args.bf16:
        for name in [n for n in best if "bf16" in n]:
            fp32 = name.replace(", bf16 autocast", "")
            print(f"{name}: {best[fp32] / best[name]:.2f}x the tokens/s of {fp32}")
        native, why = cpu_native_bf16()
        print(
            f"train.precision=auto on this CPU: {'bf16' if native else 'fp32'} ({why}); "
            f"bf16/fp32 matmul probe {bf16_matmul_speedup():.2f}x"
        )
    if args.profile:
        profile(variants[0], x, y, 6 * flops["n"] * tokens, flops["training"] * tokens, peak)


if __name__ == "__main__":
    main()
