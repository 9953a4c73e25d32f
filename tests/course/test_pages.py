"""The lesson pages: both languages exist, point at real code, and their shape tables agree with
the inspector's trace of the tiny preset (so the notes cannot drift from the model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tinyllama.course.lessons import LESSONS
from tinyllama.inspection import trace_shapes
from tinyllama.model import LlamaConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_trace() -> dict:
    """{trace name: shape} of the tiny preset for B=2, T=16, the shapes the pages quote."""
    config = LlamaConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    return dict(trace_shapes(config, seq_len=16, batch_size=2))


def _quoted_shapes(page: str, trace: dict):
    """(trace name, shape) for every table row that starts with a traced tensor's name."""
    for line in page.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("`")[1]
        names = [
            n
            for n in trace
            if n == first or n.endswith("layers.0.self_attn." + first) or n.endswith("layers.0." + first)
        ]
        shapes = re.findall(r"`\((\d+(?:, \d+)*)\)`", line)
        if len(names) == 1 and shapes:
            yield names[0], tuple(int(n) for n in shapes[-1].split(", "))


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda l: l.slug)
def test_pages_exist_in_both_languages_and_point_at_real_code(lesson):
    for lang in ("en", "zh"):
        page = lesson.page(lang).read_text(encoding="utf-8")
        assert page.startswith("# "), lesson.page(lang)
        for path in set(re.findall(r"tinyllama/[\w/]+\.py", page)):
            assert (REPO / path).is_file(), f"{lesson.page(lang)} points at missing {path}"
        assert f"python -m tinyllama.course start {lesson.number}" in page
        assert f"python -m tinyllama.course check {lesson.number}" in page
    zh = lesson.page("zh").read_text(encoding="utf-8")
    assert len(re.findall(r"[\u4e00-\u9fff]", zh)) > 300, "the Chinese page must be a real translation"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_shape_tables_match_the_inspector_trace(lang, tiny_trace):
    checked = 0
    for lesson in LESSONS:
        for name, shape in _quoted_shapes(lesson.page(lang).read_text(encoding="utf-8"), tiny_trace):
            assert shape == tiny_trace[name], (
                f"{lesson.page(lang)}: {name} is {tiny_trace[name]}, page says {shape}"
            )
            checked += 1
    assert checked >= 25  # the tables of lessons 1-6 quote most of the trace
