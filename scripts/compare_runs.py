"""Compare runs from their folders alone (config.yaml, metrics.jsonl): no wandb needed.

    python scripts/compare_runs.py runs/lr                     # every job of a sweep
    python scripts/compare_runs.py runs/a runs/b --top 3       # chosen runs; plot the best 3
    python scripts/compare_runs.py runs/lr --plot lr.png --table lr.md

Prints a Markdown table (name, overrides, parameters, tokens, final train and validation
loss, tokens/s, wall time) sorted by validation loss, and writes a PNG of the loss curves
(train and validation against tokens). By default both files go beside the runs compared:
<common parent>/compare.md and <common parent>/loss_curves.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tinyllama.compare import load_runs, markdown_table, plot_loss_curves, sort_by_val_loss
from tinyllama.errors import TinyLlamaError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("paths", nargs="+", help="run folders, or sweep folders holding run folders")
    p.add_argument("--table", type=Path, help="Markdown file to write (default: <parent>/compare.md)")
    p.add_argument("--plot", type=Path, help="PNG to write (default: <parent>/loss_curves.png)")
    p.add_argument(
        "--top",
        type=int,
        default=10,
        help="plot only the N runs with the lowest validation loss (default 10)",
    )
    p.add_argument("--no-plot", action="store_true", help="only print and write the table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = load_runs(args.paths)
        parent = Path(os.path.commonpath([r.path.resolve() for r in runs]))
        table = markdown_table(runs)
        print(table, end="")
        table_path = args.table or parent / "compare.md"
        table_path.write_text(table, encoding="utf-8")
        print(f"\ntable: {table_path}")
        if not args.no_plot:
            chosen = sort_by_val_loss(runs)[: max(1, args.top)]
            png = plot_loss_curves(
                chosen,
                args.plot or parent / "loss_curves.png",
                title=f"{len(chosen)} of {len(runs)} runs, best first",
            )
            print(f"loss curves: {png}")
    except TinyLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
