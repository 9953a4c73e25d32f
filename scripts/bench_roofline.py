"""What this CPU can do at most, and what that bounds a decoding step to: a roofline probe.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_roofline.py [--threads 2] [--model llama2c_15m]

Builds a small C probe with the compiler and flags the compiled decoding step uses
(tinyllama/kernels: -O3 -march=native, OpenMP), and measures on `--threads` threads:

- peak float32 multiply-adds: independent chains of vector FMAs, no memory (GFLOP/s);
- read bandwidth from buffers of 4 MiB, 20 MiB and 512 MiB (what stays in L2/L3 and what comes
  from DRAM; lscpu names the cache sizes), summed a vector at a time in 4 chains (GB/s).

Then, for the model preset's shape (vocab 4096), the floor each figure sets under a float32
decoding step: batch 1 must read every weight once per token (from L3 where they fit, else
DRAM), batch B must do B x 2 x weights flops. Their ratio bounds what batching can give over
batch 1 (16 x the batch-1 floor / the batch-16 floor) before the attention over the cache,
sampling and Python are counted. BENCHMARKS.md (decoding engine) uses these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from tinyllama import kernels

REPO = Path(__file__).resolve().parents[1]
L3_AT_MOST = 32 << 20  # weights up to this size are taken to stay in L3 between tokens

PROBE = r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(VL * 4)));

static double peak(int threads) {
    const long iters = 20000000;
    volatile float sink = 0;
    double t = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        vf a[12], x = {0}, y = {0};
        for (int j = 0; j < VL; j++) x[j] = 1.0000001f, y[j] = 1e-7f;
        for (int i = 0; i < 12; i++) a[i] = x * (float)i;
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) a[i] = a[i] * x + y; /* one FMA (-ffp-contract=fast) */
        float s = 0;
        for (int i = 0; i < 12; i++) s += a[i][0];
        sink += s;
    }
    t = omp_get_wtime() - t;
    return (double)threads * iters * 12 * VL * 2 / t / 1e9;
}

static double bandwidth(int threads, size_t bytes) {
    size_t n = bytes / 4;
    float *buf = aligned_alloc(64, n * 4);
    memset(buf, 0, n * 4);
    size_t reps = (size_t)(4e9 / bytes) + 1;
    volatile float sink = 0;
    double t = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        /* each thread reads its own share of the buffer, whole vectors, 4 independent sums */
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t step = 4 * VL, lo = n / step * tid / nt * step, hi = n / step * (tid + 1) / nt * step;
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, v;
        for (size_t r = 0; r < reps; r++)
            for (size_t i = lo; i < hi; i += step) {
                memcpy(&v, buf + i, sizeof v), a0 += v;
                memcpy(&v, buf + i + VL, sizeof v), a1 += v;
                memcpy(&v, buf + i + 2 * VL, sizeof v), a2 += v;
                memcpy(&v, buf + i + 3 * VL, sizeof v), a3 += v;
            }
        vf s = a0 + a1 + a2 + a3;
        sink += s[0];
    }
    t = omp_get_wtime() - t;
    free(buf);
    return (double)bytes * reps / t / 1e9;
}

int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    printf("{\"vector_floats\": %d, \"peak_gflops\": %.1f", VL, peak(threads));
    size_t sizes[] = {4u << 20, 20u << 20, 512u << 20};
    for (int i = 0; i < 3; i++) printf(", \"read_gbs_%zuMiB\": %.1f", sizes[i] >> 20, bandwidth(threads, sizes[i]));
    printf("}\n");
    return 0;
}
"""


def probe(threads: int) -> dict:
    compiler = kernels.find_compiler()
    if compiler is None:
        sys.exit("no C compiler found (set CC, or install gcc)")
    flags = [f for f in kernels.FLAGS if f not in ("-shared", "-fPIC")] + ["-fopenmp"]
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "probe.c", Path(tmp) / "probe"
        source.write_text(PROBE)
        subprocess.run([compiler, *flags, str(source), "-o", str(binary)], check=True)
        out = subprocess.run([str(binary), str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default="llama2c_15m", help="a configs/model preset")
    args = parser.parse_args()
    m = probe(args.threads)
    print(f"{args.threads} thread(s): " + ", ".join(f"{k} {v}" for k, v in m.items()))

    cfg = OmegaConf.load(REPO / "configs" / "model" / f"{args.model}.yaml")
    C, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, 4096
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    D = cfg.head_dim or C // H
    weights = L * (C * (H + 2 * H_kv) * D + H * D * C + 3 * C * I) + V * C  # the packed matrices
    nbytes = 4 * weights
    if nbytes <= L3_AT_MOST:  # the 20 MiB buffer's rate is the best case for weights in L3
        read, where = m["read_gbs_20MiB"], "L3"
    else:
        read, where = m["read_gbs_512MiB"], "DRAM"
    t1 = nbytes / (read * 1e9)
    t16 = 16 * 2 * weights / (m["peak_gflops"] * 1e9)
    print(
        f"{args.model} (vocab {V}): {weights / 1e6:.2f}M weights in the matrices, {nbytes / 2**20:.1f} MiB float32\n"
        f"batch 1 floor: read the weights from {where}: {t1 * 1e3:.3f} ms a token ({1 / t1:.0f} tok/s)\n"
        f"batch 16 floor: {16 * 2 * weights / 1e6:.0f} MFLOP at peak: {t16 * 1e3:.3f} ms a step "
        f"({16 / t16:.0f} tok/s)\n"
        f"bound on batch 16 over batch 1 from the matrices alone: {16 * t1 / t16:.1f}x"
    )


if __name__ == "__main__":
    main()
