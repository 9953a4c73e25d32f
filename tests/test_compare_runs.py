"""scripts/compare_runs.py and tinyllama.compare on fabricated run folders (the run-folder
contract alone: config.yaml, metrics.jsonl, launches.jsonl)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tinyllama.compare import load_runs, markdown_table
from tinyllama.errors import DataError

REPO = Path(__file__).resolve().parent.parent

# 1 layer, hidden 16, 2 query heads and 1 kv head of 8, MLP 32, vocab 64, tied head:
# embeddings 64*16 + q,o 2*16*16 + k,v 2*16*8 + MLP 3*16*32 + norms 3*16 = 3376 parameters.
TINY_MODEL = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)
TINY_PARAMS = 3376


def _compare_script():
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_run(
    folder: Path, overrides, losses, val_losses, tok_per_s=500.0, config=True, tail: str = ""
) -> Path:
    """A run folder as the train loop writes it: one training line per 10 steps of 100 tokens
    each (1000 tokens per line), an evaluation line after every second training line."""
    folder.mkdir(parents=True)
    # The first launch started the run; a resume appends another line with its own overrides.
    launches = [{"overrides": list(overrides)}, {"overrides": ["train.max_steps=999"]}]
    (folder / "launches.jsonl").write_text("".join(json.dumps(x) + "\n" for x in launches))
    if config:
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL, "run": {"name": "x"}}))
    lines = []
    for i, loss in enumerate(losses, start=1):
        lines.append({"step": 10 * i, "loss": loss, "lr": 1e-3, "tokens": 1000 * i, "tok_per_s": tok_per_s})
        if i % 2 == 0 and val_losses:
            lines.append({"step": 10 * i, "val_loss": val_losses.pop(0), "val_ppl": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "lr"
    make_run(
        root / "0_optim.lr=0.001", ["optim.lr=0.001", "train.max_steps=40"], [5.0, 4.0, 3.5, 3.2], [4.1, 3.4]
    )
    make_run(
        root / "1_optim.lr=0.003",
        ["optim.lr=0.003", "train.max_steps=40"],
        [5.0, 3.6, 3.0, 2.8],
        [3.7, 2.9],
        tok_per_s=250.0,
    )
    # Killed mid-write before its first evaluation, and its config.yaml never landed.
    make_run(
        root / "2_optim.lr=0.01",
        ["optim.lr=0.01", "train.max_steps=40"],
        [6.0],
        [],
        config=False,
        tail='{"step": 20, "lo',
    )
    return root


def test_summary_figures_from_the_run_folder(sweep: Path):
    runs = {r.name: r for r in load_runs([sweep])}
    assert list(runs) == ["0_optim.lr=0.001", "1_optim.lr=0.003", "2_optim.lr=0.01"]
    best = runs["1_optim.lr=0.003"]
    assert best.parameters == TINY_PARAMS
    assert best.tokens == 4000 and best.train_loss == 2.8 and best.val_loss == 2.9
    # 4 windows of 1000 tokens at 250 tokens/s.
    assert best.wall_s == pytest.approx(16.0) and best.tok_per_s == pytest.approx(250.0)
    # Evaluation lines carry steps only; they are placed at the tokens of that step.
    assert best.val_curve == [(2000, 3.7), (4000, 2.9)]
    assert best.overrides == ["optim.lr=0.003", "train.max_steps=40"] and best.notes == []
    broken = runs["2_optim.lr=0.01"]
    assert broken.parameters is None and broken.val_loss is None and broken.tokens == 1000
    assert any("config.yaml" in n for n in broken.notes)
    assert any("line 2 is not JSON" in n for n in broken.notes)
    assert any("no evaluation yet" in n for n in broken.notes)


def test_table_sorted_by_val_loss_with_differing_overrides(sweep: Path):
    table = markdown_table(load_runs([sweep]))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == [
        "1_optim.lr=0.003",
        "0_optim.lr=0.001",
        "2_optim.lr=0.01",
    ]
    assert rows[0].split("|")[2].strip() == "`optim.lr=0.003`"  # the shared override moves below
    assert "Overrides common to every run: `train.max_steps=40`" in table
    assert "| 3.38k | 4k | 2.8000 | 2.9000 | 250 | 16.0s |" in rows[0]
    assert "- 2_optim.lr=0.01: no config.yaml" in table


def test_script_writes_table_and_png_for_chosen_runs(sweep: Path, tmp_path: Path, capsys):
    png, md = tmp_path / "out" / "curves.png", tmp_path / "out.md"
    chosen = [sweep / "0_optim.lr=0.001", sweep / "2_optim.lr=0.01"]
    assert _compare_script().main([*map(str, chosen), "--plot", str(png), "--table", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert md.read_text() in capsys.readouterr().out
    assert "1_optim" not in md.read_text()


def test_script_defaults_write_beside_the_sweep(sweep: Path):
    assert _compare_script().main([str(sweep), "--top", "1"]) == 0
    assert (sweep / "compare.md").is_file() and (sweep / "loss_curves.png").is_file()


def test_a_run_folder_holding_sweep_jobs_lists_both(tmp_path: Path):
    make_run(tmp_path / "demo", [], [5.0, 4.0], [4.5])  # python train.py
    make_run(tmp_path / "demo" / "0", ["optim.lr=0.01"], [5.0, 3.0], [3.5])  # then a sweep, same name
    runs = load_runs([tmp_path / "demo"])
    assert [r.name for r in runs] == ["demo", "0"] and runs[1].val_loss == 3.5


def test_clear_errors_for_empty_or_missing_folders(tmp_path: Path, capsys):
    with pytest.raises(DataError, match="no run folder inside"):
        load_runs([tmp_path])
    assert _compare_script().main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    # A run that has not logged yet: a row of dashes, and nothing to plot.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL}))
    assert _compare_script().main([str(tmp_path / "fresh")]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_runs_made_before_launches_were_recorded_read_hydras_overrides(tmp_path):
    run = make_run(tmp_path / "old", ["optim.lr=0.1"], [3.0, 2.0], [2.5])
    (run / "launches.jsonl").unlink()
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optim.lr=0.2"]))
    (run / ".hydra" / "config.yaml").write_text("{}\n")  # Hydra's snapshot: not a run folder
    [found] = load_runs([tmp_path])
    assert found.overrides == ["optim.lr=0.2"]
