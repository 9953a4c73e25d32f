"""The server under load: 1, 4 and 16 concurrent clients against a run's checkpoint.

    flock /tmp/bench.lock .venv/bin/python scripts/bench_serve.py --run runs/chat_demo
    flock /tmp/bench.lock .venv/bin/python scripts/bench_serve.py --run runs/demo --clients 1,8 --max-tokens 128

The real server (scripts/serve.py on a free loopback port, in its own process) driven over HTTP by
client threads in this one. Each client sends
--requests streamed /v1/completions requests one after another (a story opening, sampled at
temperature 0.8 with its own seed, --max-tokens new tokens, stopping early only at end of text),
and records:

- time to first token (TTFT): from sending the request to its first text chunk;
- latency: from sending the request to `data: [DONE]`;
- completion tokens, from the `usage` chunk (stream_options.include_usage).

Total tokens/s = all clients' completion tokens / the wall time of the round; "rows" = completion
tokens / decoding steps of the round (from /health), the mean batch the engine decoded, which
shows that concurrent requests were decoded together. --rounds rounds of every client count
alternate, and each line is its count's median round (the others' rates follow it), so that
"x 1" compares rounds from the same minutes of a shared machine. --threads sets the server's
serve.threads (torch threads of its engine; default: the stage's own, one fewer than the cores);
the clients share the same cores.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import httpx

REPO = Path(__file__).resolve().parent.parent

OPENINGS = [
    "Once upon a time, there was a little girl named",
    "One day, a boy went to the park with his",
    "The sun was shining and the birds were",
    "Tom had a red ball. He liked to",
    "In a small town, there lived a kind old",
    "Lily and her mom went to the store to buy",
    "The cat saw a big box in the garden and",
    "It was a cold night. The dog",
]


def percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


TEXT = re.compile(rb'"text": "[^"]')  # a chunk with a non-empty piece of text


def client(url: str, index: int, requests: int, max_tokens: int, out: List[Dict]) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        for r in range(requests):
            body = {
                "prompt": OPENINGS[(index + r) % len(OPENINGS)],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": 1000 * index + r,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start = time.perf_counter()
            first, received = None, []
            # The clients share the server's cores, so they read the stream as bytes and parse only
            # what they report (a JSON parse per token here took as much CPU as the server's
            # own work per token, and made 8 clients a measure of the clients).
            with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                for data in response.iter_bytes():
                    received.append(data)
                    if first is None and TEXT.search(data):
                        first = time.perf_counter()
            end = time.perf_counter()
            events = [e for e in b"".join(received).split(b"\n\n") if e.strip()]
            assert events[-1] == b"data: [DONE]", events[-1]
            usage = json.loads(events[-2][len(b"data: ") :])["usage"]
            out.append(
                {"ttft": (first or end) - start, "latency": end - start, "tokens": usage["completion_tokens"]}
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default="runs/chat_demo", help="run folder (or a checkpoint) to serve")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per round")
    parser.add_argument("--requests", type=int, default=16, help="requests each client sends in a round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table gives medians")
    parser.add_argument("--threads", type=int, default=None, help="serve.threads (default: the stage's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="another override for the server"
    )
    args = parser.parse_args()
    if not Path(args.run).exists():
        sys.exit(
            f"{args.run} does not exist: train it first (make demo, then python train.py experiment=chat_demo)"
        )
    where = f"checkpoint_path={args.run}" if Path(args.run).is_file() else f"run.dir={args.run}"
    command = [sys.executable, str(REPO / "scripts" / "serve.py"), where, "serve.port=0"]
    command += [f"serve.max_batch={args.max_batch}", "hydra.run.dir=.", "hydra.output_subdir=null"]
    if args.threads is not None:
        command.append(f"serve.threads={args.threads}")
    command += args.set
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if " at http" not in line:
            sys.exit(f"the server did not start: {line}")
        url = line.split(" at ", 1)[1].split()[0]
        print(line.strip())
        print(
            f"{args.requests} requests per client, {args.max_tokens} new tokens each, {args.rounds} rounds, "
            f"serve.threads={'default' if args.threads is None else args.threads}"
            + "".join(f", {o}" for o in args.set)
        )
        bench(url, args)
    finally:
        server.terminate()
        server.wait(30)


def bench(url: str, args) -> None:
    client(url, 0, 2, 8, [])  # warm-up: the first steps build the decoder's packed weights
    print(
        f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'x 1':>5} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'lat p50':>8} {'lat p95':>8} {'rows':>5}"
    )
    http = httpx.Client(base_url=url)
    counts = [int(c) for c in args.clients.split(",")]
    rounds: Dict[int, List[Dict]] = {c: [] for c in counts}
    # The rounds alternate (1, 4, 8, 16, 1, 4, ...), so a slower minute of a shared machine falls
    # on every client count alike; the table gives each count's median round.
    for _ in range(args.rounds):
        for clients in counts:
            rounds[clients].append(one_round(url, http, clients, args))
    base = None
    for clients in counts:
        r = sorted(rounds[clients], key=lambda r: r["rate"])[len(rounds[clients]) // 2]
        base = base or r["rate"]
        rates = " ".join(f"{x['rate']:.0f}" for x in rounds[clients])
        spread = "" if args.rounds == 1 else f"  (rounds: {rates})"
        print(
            f"{clients:>7} {r['requests']:>8} {r['tokens']:>7} {r['rate']:>8.0f} {r['rate'] / base:>5.1f} "
            f"{statistics.median(r['ttft']) * 1000:>7.0f}ms {percentile(r['ttft'], 0.95) * 1000:>7.0f}ms "
            f"{statistics.median(r['latency']):>7.2f}s {percentile(r['latency'], 0.95):>7.2f}s {r['rows']:>5.1f}"
            + spread
        )


def one_round(url: str, http: httpx.Client, clients: int, args) -> Dict:
    """`clients` concurrent clients, each sending args.requests requests: their total tokens/s,
    TTFTs and latencies, and the mean rows per decoding step."""
    results: List[Dict] = []
    steps = http.get("/health").json()["steps"]
    threads = [
        threading.Thread(target=client, args=(url, i, args.requests, args.max_tokens, results))
        for i in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert len(results) == clients * args.requests, "a request was lost"
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "rate": tokens / wall,
        "rows": tokens / (http.get("/health").json()["steps"] - steps),  # mean rows per decoding step
        "ttft": [r["ttft"] for r in results],
        "latency": [r["latency"] for r in results],
    }


if __name__ == "__main__":
    main()
