"""Run one benchmark command on two commits, alternating, in one session: old and new side by side.

    python scripts/bench_ab.py OLD NEW [--repeats 2] -- scripts/bench_model.py --rounds 4 --threads 1

OLD and NEW are git revisions (a branch, a tag, a commit; NEW defaults to the working tree when
given as "."). Each is checked out into a temporary worktree; the command runs there with this
interpreter, in the order OLD, NEW, OLD, NEW, ... so both see the same machine load, and every
output is printed under its label. Absolute figures on a shared machine move from minute to
minute; compare the two labels within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A folder holding `rev` ("." is the working tree itself), removed afterwards."""
    if rev == ".":
        yield REPO
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-ab-")) / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(folder), rev], check=True
    )
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], check=False)


def run(tree: Path, command: List[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, *command], cwd=tree, env=env, capture_output=True, text=True)
    return done.stdout + (f"\n[exit {done.returncode}]\n{done.stderr[-2000:]}" if done.returncode else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the command per revision")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not command:
        parser.error("give the command after --, e.g. -- scripts/bench_model.py --threads 1")
    with checkout(args.old) as old, checkout(args.new) as new:
        for i in range(args.repeats):
            for label, tree in (("old", old), ("new", new)):
                rev = args.old if label == "old" else args.new
                print(f"\n===== {label} ({rev}), run {i + 1} of {args.repeats} =====", flush=True)
                print(run(tree, command), flush=True)


if __name__ == "__main__":
    main()
