"""The one atomic-write mechanism: a folder appears complete or not at all, what a killed writer
left is removed, a live writer's folder and an existing artifact are kept."""

from __future__ import annotations

import os

import pytest

from tinyllama.atomic import building_folder, write_text_atomic
from tinyllama.errors import ConfigError


def test_a_folder_appears_only_when_complete(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        with building_folder(out) as tmp:
            (tmp / "part").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with building_folder(out) as tmp:
        (tmp / "whole").write_text("done")
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"] and (out / "whole").read_text() == "done"


def test_an_existing_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old").write_text("kept")
    with pytest.raises(ConfigError, match="already exists and is not empty; it is kept. Set x=1"):
        with building_folder(out, hint="set x=1"):
            pytest.fail("built although refused")
    with building_folder(out, overwrite=True) as tmp:
        (tmp / "new").write_text("replaced")
    assert [p.name for p in out.iterdir()] == ["new"]


def test_a_concurrent_writer_that_finished_first_is_kept(tmp_path):
    out = tmp_path / "art"
    with building_folder(out) as tmp:
        (tmp / "ours").write_text("late")
        out.mkdir()
        (out / "theirs").write_text("first")
    assert [p.name for p in out.iterdir()] == ["theirs"] and len(list(tmp_path.iterdir())) == 1


def test_leftovers_of_dead_writers_go_and_a_live_writers_stay(tmp_path):
    dead = tmp_path / ".tmp-step_2-999999999"  # no such pid
    live = tmp_path / f".tmp-step_3-{os.getppid()}"
    for folder in (dead, live):
        folder.mkdir()
    with building_folder(tmp_path / "step_4"):
        pass
    assert not dead.exists() and live.exists()


def test_write_text_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "latest"
    write_text_atomic(path, "step_1\n")
    write_text_atomic(path, "step_2\n")
    assert path.read_text() == "step_2\n" and [p.name for p in tmp_path.iterdir()] == ["latest"]
