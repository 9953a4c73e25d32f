"""Course mode: `python -m tinyllama.course list|start|check|train`.

    python -m tinyllama.course list                 # the lessons, their pages and your progress
    python -m tinyllama.course start 3              # copy the RoPE exercise into ./course_workspace/
    python -m tinyllama.course check 3              # grade it against tinyllama/model/
    python -m tinyllama.course train --seconds 60   # final exercise: your pieces in the real model
    python -m tinyllama.course train --lang zh      # the same, learning the built-in Chinese stories

A plain argparse tool, not a Hydra stage: it takes no config tree, only a lesson and a folder.
The workspace is `--workspace`, else $TINYLLAMA_COURSE_DIR, else ./course_workspace/.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from tinyllama.course.lessons import LESSONS, get_lesson, learner_file, start_lesson, workspace_dir
from tinyllama.errors import TinyLlamaError

# The demo's tiny model, with smaller batches and a shorter warmup than `python train.py`, so
# that a one-minute run on a laptop CPU takes enough steps to show the loss falling. The
# learner's own overrides come after these, so they win.
FINAL_OVERRIDES = [
    "model=tiny",
    "train.batch_size=8",
    "train.seq_len=64",
    "optim.lr=3e-3",
    "optim.warmup_steps=10",
    "train.log_every=10",
]
# What the model learns, by --lang: the synthetic stories, or the Chinese ones with the Chinese
# tokenizer, vocabulary and prompt of the Chinese demo (configs/experiment/demo_zh.yaml).
CORPUS_OVERRIDES = {"en": ["data=synthetic"], "zh": ["experiment=demo_zh"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyllama.course",
        description="Write the pieces of a Llama model yourself, graded against tinyllama/model/.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add_workspace(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--workspace",
            help="folder of your exercise files (default: $TINYLLAMA_COURSE_DIR or ./course_workspace)",
        )

    sp = sub.add_parser("list", help="list the lessons and which ones you have started")
    add_workspace(sp)
    sp.add_argument("--lang", default="en", choices=["en", "zh"], help="language of the pages")

    sp = sub.add_parser("start", help="copy a lesson's exercise stub into your workspace")
    sp.add_argument("lesson", help="lesson number (1-8) or name (e.g. rope)")
    add_workspace(sp)
    sp.add_argument(
        "--force",
        action="store_true",
        help="start over: keep the existing file as a .bak backup, copy a fresh stub",
    )
    sp.add_argument("--name", help="file name in the workspace (default lessonN_<name>.py)")

    sp = sub.add_parser("check", help="grade your exercise file for a lesson")
    sp.add_argument("lesson", help="lesson number (1-8) or name (e.g. rope)")
    add_workspace(sp)
    sp.add_argument("--file", help="grade this file instead of the workspace's lessonN_<name>.py")

    sp = sub.add_parser("train", help="final exercise: train the tiny model built from your pieces")
    add_workspace(sp)
    sp.add_argument("--seconds", type=float, default=60.0, help="training time budget (default 60)")
    sp.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    sp.add_argument(
        "--lang",
        default="en",
        choices=sorted(CORPUS_OVERRIDES),
        help="language of the stories the model learns and writes: en (data=synthetic) "
        "or zh (the Chinese stories, data=synthetic_zh)",
    )
    sp.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides as for train.py, e.g. train.batch_size=16 "
        "model.num_hidden_layers=2 (applied after: " + " ".join(FINAL_OVERRIDES) + ")",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except TinyLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    workspace = workspace_dir(args.workspace)
    if args.command == "list":
        for lesson in LESSONS:
            mark = "started" if (workspace / lesson.stub_name).exists() else "       "
            print(f"{lesson.number:>2}. [{mark}] {lesson.title:45s} {lesson.page(args.lang)}")
        return 0
    if args.command == "start":
        lesson = get_lesson(args.lesson)
        path, backup = start_lesson(lesson, workspace, force=args.force, name=args.name)
        if backup is not None:
            print(f"kept your previous file as {backup}")
        print(
            f"lesson {lesson.number}: {lesson.title}\n  read:  {lesson.page('en')}"
            f"  (Chinese: {lesson.page('zh')})\n  edit:  {path}\n"
            f"  check: python -m tinyllama.course check {lesson.number}"
            + (f" --file {path}" if args.name else "")
        )
        return 0
    if args.command == "check":
        from tinyllama.course.checks import run_check

        lesson = get_lesson(args.lesson)
        report = run_check(lesson, learner_file(lesson, workspace, args.file))
        print(f"lesson {lesson.number}: {lesson.title}")
        print(report.render())
        return 0 if report.passed else 1
    if args.command == "train":
        from tinyllama.course.final import train_with_learner_pieces

        print("final exercise: the tiny model built from your pieces")
        result = train_with_learner_pieces(
            _compose_job(args.overrides, args.lang), workspace, seconds=args.seconds, max_steps=args.max_steps
        )
        return 0 if result.loss_fell else 1
    raise AssertionError(args.command)  # argparse only lets the commands above through


def _compose_job(overrides: List[str], lang: str = "en"):
    """The JobConfig that `python train.py <CORPUS_OVERRIDES[lang]> <FINAL_OVERRIDES> <overrides>`
    would run (same YAML tree, same validation)."""
    from tinyllama.cli import compose_job

    return compose_job(CORPUS_OVERRIDES[lang] + FINAL_OVERRIDES + list(overrides))


if __name__ == "__main__":
    sys.exit(main())
