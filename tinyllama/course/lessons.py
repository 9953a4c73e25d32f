"""The lesson registry and the learner's workspace.

Each lesson has a page per language (`course/<lang>/NN-<slug>.md`), a stub file that `start`
copies into the learner's workspace (`tinyllama/course/stubs/lessonN_<slug>.py`), and a check
(`tinyllama.course.checks.CHECKS[slug]`). The workspace lives outside the package, so a
reinstall never touches the learner's work: `./course_workspace/` by default, or the folder in
$TINYLLAMA_COURSE_DIR, or `--workspace`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from tinyllama.errors import TinyLlamaError

STUB_DIR = Path(__file__).resolve().parent / "stubs"
COURSE_DIR = Path(__file__).resolve().parent.parent.parent / "course"
WORKSPACE_ENV = "TINYLLAMA_COURSE_DIR"
DEFAULT_WORKSPACE = "course_workspace"


class CourseError(TinyLlamaError):
    """A course command cannot run as asked (unknown lesson, missing file, file exists)."""


@dataclass(frozen=True)
class Lesson:
    number: int
    slug: str
    title: str

    @property
    def stub_name(self) -> str:
        return f"lesson{self.number}_{self.slug}.py"

    @property
    def stub_path(self) -> Path:
        return STUB_DIR / self.stub_name

    def page(self, lang: str = "en") -> Path:
        return COURSE_DIR / lang / f"{self.number:02d}-{self.slug}.md"


LESSONS: Tuple[Lesson, ...] = (
    Lesson(1, "tokens", "Tokens and embeddings"),
    Lesson(2, "rmsnorm", "RMSNorm"),
    Lesson(3, "rope", "Rotary position embeddings (RoPE)"),
    Lesson(4, "attention", "Attention and grouped-query attention (GQA)"),
    Lesson(5, "mlp", "The SwiGLU MLP"),
    Lesson(6, "decoder", "The decoder layer and the full model"),
    Lesson(7, "generation", "KV cache and sampling"),
    Lesson(8, "training", "Training a tiny model end to end"),
    Lesson(9, "chat", "Fine-tuning for chat (SFT)"),
    Lesson(10, "post_training", "Preference and reward training (DPO, GRPO)"),
)


def get_lesson(key: str) -> Lesson:
    """A lesson by number ("3") or slug ("rope")."""
    for lesson in LESSONS:
        if key in (str(lesson.number), lesson.slug, f"lesson{lesson.number}"):
            return lesson
    names = ", ".join(f"{l.number} ({l.slug})" for l in LESSONS)
    raise CourseError(f"unknown lesson {key!r}: choose one of {names}")


def workspace_dir(workspace: Optional[str] = None) -> Path:
    """--workspace, else $TINYLLAMA_COURSE_DIR, else ./course_workspace."""
    return Path(workspace or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


def start_lesson(
    lesson: Lesson, workspace: Path, force: bool = False, name: Optional[str] = None
) -> Tuple[Path, Optional[Path]]:
    """Copy the lesson's stub into the workspace; return (new file, backup of the old one or None).

    An existing learner file is never overwritten: without `force` this refuses; with `force`
    the old file is first renamed to `<name>.bak`, `<name>.bak1`, ... (never replacing a backup).
    """
    target = workspace / (name or lesson.stub_name)
    if target.suffix != ".py":
        raise CourseError(f"--name {target.name!r}: the exercise file must end in .py")
    backup = None
    if target.exists():
        if not force:
            raise CourseError(
                f"{target} already exists and holds your work, so it was left untouched. To start "
                f"over, run again with --force (your file is kept as a .bak backup), or pick another "
                f"file name with --name lesson{lesson.number}_try2.py"
            )
        backup = _free_backup_name(target)
        target.rename(backup)
    workspace.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lesson.stub_path, target)
    return target, backup


def _free_backup_name(target: Path) -> Path:
    n = 0
    while True:
        candidate = target.with_name(target.name + (".bak" if n == 0 else f".bak{n}"))
        if not candidate.exists():
            return candidate
        n += 1


def learner_file(lesson: Lesson, workspace: Path, file: Optional[str] = None) -> Path:
    """The learner's file for `lesson` (or `file`), which must exist."""
    path = Path(file) if file else workspace / lesson.stub_name
    if not path.is_file():
        raise CourseError(
            f"{path} does not exist: run `python -m tinyllama.course start "
            f"{lesson.number}` first (or pass --file with your file's path)"
        )
    return path
