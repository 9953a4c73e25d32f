"""`python -m tinyllama.course start|check|list`: the workspace, never overwriting, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tinyllama.course.__main__ import main
from tinyllama.course.lessons import LESSONS, WORKSPACE_ENV, get_lesson, start_lesson

SOLUTIONS = Path(__file__).resolve().parent / "solutions"


def test_start_copies_the_stub_into_the_workspace(tmp_path, capsys):
    assert main(["start", "rope", "--workspace", str(tmp_path / "ws")]) == 0
    copied = tmp_path / "ws" / "lesson3_rope.py"
    assert copied.read_text() == get_lesson("3").stub_path.read_text()
    assert "raise NotImplementedError" in copied.read_text()
    assert "check 3" in capsys.readouterr().out


def test_start_never_overwrites_the_learners_file(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["start", "2", "--workspace", str(ws)]) == 0
    mine = ws / "lesson2_rmsnorm.py"
    mine.write_text("# my work\n")
    assert main(["start", "2", "--workspace", str(ws)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "--name" in err
    assert mine.read_text() == "# my work\n"


def test_start_force_keeps_a_backup_and_never_replaces_one(tmp_path):
    lesson = get_lesson("4")
    ws = tmp_path / "ws"
    start_lesson(lesson, ws)
    for attempt in ("first", "second"):
        (ws / lesson.stub_name).write_text(f"# {attempt}\n")
        path, backup = start_lesson(lesson, ws, force=True)
        assert backup.read_text() == f"# {attempt}\n"
        assert path.read_text() == lesson.stub_path.read_text()
    assert sorted(p.name for p in ws.iterdir()) == [
        lesson.stub_name,
        lesson.stub_name + ".bak",
        lesson.stub_name + ".bak1",
    ]


def test_start_with_a_new_name_and_the_env_workspace(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "from_env"))
    assert main(["start", "5", "--name", "mlp_try2.py"]) == 0
    assert (tmp_path / "from_env" / "mlp_try2.py").is_file()
    assert "--file" in capsys.readouterr().out  # tells how to check a renamed file


def test_check_exit_status_and_report(tmp_path, capsys):
    assert main(["check", "5", "--file", str(SOLUTIONS / "lesson5_mlp.py")]) == 0
    assert "3/3 cases pass" in capsys.readouterr().out
    assert main(["start", "5", "--workspace", str(tmp_path)]) == 0
    assert main(["check", "5", "--workspace", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "hint: not implemented yet" in out


def test_check_before_start_and_unknown_lesson_are_clear_errors(tmp_path, capsys):
    assert main(["check", "3", "--workspace", str(tmp_path)]) == 2
    assert "run `python -m tinyllama.course start 3` first" in capsys.readouterr().err
    assert main(["start", "99", "--workspace", str(tmp_path)]) == 2
    assert "unknown lesson '99'" in capsys.readouterr().err


def test_list_shows_progress(tmp_path, capsys):
    main(["start", "1", "--workspace", str(tmp_path)])
    capsys.readouterr()
    assert main(["list", "--workspace", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(LESSONS) and "[started]" in lines[0] and "[started]" not in lines[1]


def test_module_entry_point_runs(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyllama.course",
            "check",
            "2",
            "--file",
            str(SOLUTIONS / "lesson2_rmsnorm.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "all cases pass" in out.stdout
