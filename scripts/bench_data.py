"""Benchmark packing: throughput against single-process SentencePiece encode, and peak memory.

    flock /tmp/bench.lock python scripts/bench_data.py     # 20 MB: 0 (in-process), 1, 2 workers; 80 MB: 2
    python scripts/bench_data.py --mb 20 --workers 1 2 4 --memory-mb 20 80 320

The synthetic stories are written once to .txt files (train and validation, stories separated
by <|endoftext|> lines) and a bpe_4k tokenizer is trained once. Then, in the same run:
  - encode: SentencePieceProcessor.encode(batch of ~1 MB of documents, num_threads=1) over the
    same documents in one process, text already in memory (what one core can do);
  - pack: ensure_packed(data=text_files on those files) with N worker threads (0: encode in the
    main thread), in a fresh child process, end to end (reading, encoding, shard writing), with
    the peak RSS of the packing process (sampled every 0.1 s, and the kernel's high-water mark),
    and of any child processes it starts (none since packing moved to threads);
  - pack (synthetic source): the same stories generated on the fly by the packing process.
Throughput is reported in tokens/s and MB/s of UTF-8 text.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STORY_BYTES = 625  # rough mean size of a synthetic story, to turn MB into a story count


def _memory_mb(pid, field: str = "Rss") -> float:
    """Rss or Pss (shared pages split among the processes sharing them) of a process, from
    /proc/<pid>/smaps_rollup (Linux); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished child processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _children(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class TreeMemory(threading.Thread):
    """Samples, every 0.1 s, the packing process's RSS, each worker's RSS, and the real total of
    the tree: the sum of PSS, since forked workers share most of their pages with the parent."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_self = self.peak_worker = self.peak_total = 0.0
        self.running = True

    def run(self) -> None:
        me = os.getpid()
        while self.running:
            workers = _children(me)
            self.peak_self = max(self.peak_self, _memory_mb(me))
            self.peak_worker = max([self.peak_worker] + [_memory_mb(w) for w in workers])
            self.peak_total = max(self.peak_total, sum(_memory_mb(p, "Pss") for p in [me] + workers))
            time.sleep(0.1)


def data_cfg(args):
    from tinyllama.config import DataConfig

    if args.train_file:  # the stories written to disk: the packer reads files
        return DataConfig(
            name="bench",
            source="text_files",
            train_files=[args.train_file],
            val_files=[args.val_file],
            num_workers=args.workers,
            root=args.root,
        )
    return DataConfig(name="bench", num_docs=args.num_docs, seed=0, num_workers=args.workers, root=args.root)


def child_pack(args) -> None:
    """Run in a fresh process: pack, then report time and peak memory as one JSON line."""
    from tinyllama.data import ensure_packed, read_meta
    from tinyllama.tokenizer import Tokenizer

    tok = Tokenizer.load(args.model)
    cfg = data_cfg(args)
    rss_imports = _memory_mb(os.getpid())
    memory = TreeMemory()
    memory.start()
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    out = ensure_packed(cfg, tok)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0  # this process and its (joined) workers
    memory.running = False
    memory.join()
    meta = read_meta(out)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"],
                "rss_imports_mb": rss_imports,
                "rss_peak_mb": max(
                    memory.peak_self, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                ),
                "rss_worker_peak_mb": memory.peak_worker,
                "rss_total_peak_mb": memory.peak_total,
            }
        )
    )


def write_corpus(num_docs: int, folder: Path):
    """Write the synthetic source's train and val stories to files; return (paths, MB)."""
    from tinyllama.config import DataConfig
    from tinyllama.data import iter_documents

    cfg = DataConfig(name="bench", num_docs=num_docs, seed=0)
    paths, size = [], 0
    for split in ("train", "val"):
        path = folder / f"stories-{num_docs}-{split}.txt"
        with open(path, "w", encoding="utf-8") as f:
            for doc in iter_documents(cfg, split):
                f.write(doc + "\n<|endoftext|>\n")
                size += len(doc.encode())
        paths.append(str(path))
    return paths, size / 1e6


def read_docs(paths):
    return [
        d.strip()
        for p in paths
        for d in Path(p).read_text(encoding="utf-8").split("\n<|endoftext|>\n")
        if d.strip()
    ]


def bench_encode(model: str, docs) -> dict:
    import sentencepiece as spm

    from tinyllama.data.pack import CHUNK_BYTES, _chunks

    sp = spm.SentencePieceProcessor(model_file=model)
    chunks = list(_chunks(iter(docs), CHUNK_BYTES))
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokens = sum(len(ids) + 2 for chunk in chunks for ids in sp.encode(chunk, num_threads=1))
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0, "tokens": tokens}


def run_pack(model: str, workers: int, root: Path, files=None, num_docs: int = 0) -> dict:
    out_root = tempfile.mkdtemp(prefix=f"w{workers}-", dir=root)  # always a fresh pack
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        model,
        "--workers",
        str(workers),
        "--root",
        out_root,
        "--num-docs",
        str(num_docs),
    ]
    if files:
        cmd += ["--train-file", files[0], "--val-file", files[1]]
    env = dict(os.environ, TINYLLAMA_PROGRESS="0")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_tokenizer(files, root: Path) -> str:
    from tinyllama.config import DataConfig, TokenizerConfig
    from tinyllama.tokenizer import ensure_tokenizer

    data = DataConfig(
        name="bench", source="text_files", train_files=[files[0]], val_files=[files[1]], root=str(root)
    )
    return str(ensure_tokenizer(TokenizerConfig(name="bpe_4k", max_train_bytes=5_000_000), data).model_path)


def row(name: str, r: dict, mb: float, base: dict = None) -> str:
    """One table line; "vs encode" compares wall-clock rates, "CPU vs encode" the CPU seconds
    spent per token (1.00 = no overhead over bare encoding; independent of other load)."""
    tps = r["tokens"] / r["seconds"]
    speed = f"{tps / (base['tokens'] / base['seconds']):.2f}x" if base else "1.00x"
    cpu = (
        f"{(r['cpu_seconds'] / r['tokens']) / (base['cpu_seconds'] / base['tokens']):.2f}" if base else "1.00"
    )
    mem = (
        f"{r['rss_peak_mb']:.0f} MB | {r['rss_worker_peak_mb']:.0f} MB | {r['rss_total_peak_mb']:.0f} MB"
        if "rss_peak_mb" in r
        else "- | - | -"
    )
    return (
        f"| {name} | {mb:.1f} | {r['tokens'] / 1e6:.2f} M | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
        f"{tps / 1e6:.2f} M | {mb / r['seconds']:.2f} | {speed} | {cpu} | {mem} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20, help="corpus size for the throughput comparison")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="encoding threads; 0: the main thread"
    )
    p.add_argument("--memory-mb", type=float, nargs="+", default=[20, 80], help="sizes for the memory check")
    p.add_argument("--memory-workers", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--num-docs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    p.add_argument("--val-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.workers = args.workers[0]
        return child_pack(args)

    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        root = Path(tmp)
        num_docs = int(args.mb * 1e6 / STORY_BYTES)
        files, mb = write_corpus(num_docs, root)
        model = train_tokenizer(files, root)
        docs = read_docs(files)
        print(
            f"corpus: {len(docs)} synthetic stories, {mb:.1f} MB; tokenizer bpe_4k; cpus: {os.cpu_count()}; "
            f"load: {os.getloadavg()}"
        )
        print(
            "| run | MB | tokens | s | CPU s | tokens/s | MB/s | vs encode | CPU vs encode | peak RSS main | "
            "RSS per worker | PSS all |"
        )
        print("|" + "---|" * 12)
        base = bench_encode(model, docs)
        del docs
        print(row("SentencePiece encode, 1 process (text in memory)", base, mb), flush=True)
        for w in args.workers:
            r = run_pack(model, w, root, files=files)
            print(
                row(f"ensure_packed from files, {w or 'no'} worker{'s' * (w != 1)}", r, mb, base), flush=True
            )
        r = run_pack(model, args.workers[-1], root, num_docs=num_docs)
        print(
            row(
                f"ensure_packed, synthetic source (generation included), {args.workers[-1]} workers",
                r,
                mb,
                base,
            ),
            flush=True,
        )
        for size in args.memory_mb:
            paths, size_mb = write_corpus(int(size * 1e6 / STORY_BYTES), root)
            r = run_pack(model, args.memory_workers, root, files=paths)
            print(
                row(
                    f"memory check: from files, {args.memory_workers} workers (imports alone: "
                    f"{r['rss_imports_mb']:.0f} MB)",
                    r,
                    size_mb,
                    base,
                ),
                flush=True,
            )
            for p in paths:
                os.remove(p)
        print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
