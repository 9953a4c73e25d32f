"""One check per lesson: named cases comparing the learner's file with tinyllama/model/.

Each lesson module exposes `check(grader, learner)`: it adds cases to the `Grader` (see
`tinyllama.course.grading`), each case building random inputs (several seeds, shapes and, where
precision matters, dtypes), running the learner's code and the reference, and comparing them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tinyllama.course.grading import CaseResult, Grader, Mismatch, Report, load_learner_module
from tinyllama.course.lessons import Lesson


def run_check(lesson: Lesson, path: Path) -> Report:
    """Grade the learner's file `path` for `lesson`; never raises for a broken learner file."""
    grader = Grader(lesson.slug, path)
    try:
        learner = load_learner_module(path)
    except Mismatch as e:
        grader.report.results.append(CaseResult("import your file", False, str(e)))
        return grader.report
    checks = importlib.import_module(f"tinyllama.course.checks.{lesson.slug}")
    checks.check(grader, learner)
    return grader.report
