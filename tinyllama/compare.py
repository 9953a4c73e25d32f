"""Compare training runs from their run folders alone: no wandb, no checkpoints loaded.

A run folder (runs/<name>/, or one job's runs/<sweep>/<N>/, as the training loop writes it; see
tinyllama/run_record.py) holds `config.yaml` (the resolved config) and `metrics.jsonl`
(training lines: step, loss, lr, tokens, tok_per_s; evaluation lines: step, val_loss);
and `launches.jsonl`, whose first line has the command-line overrides that started the run.
From those:

    runs = [load_run(p) for p in find_run_dirs(["runs/lr"])]   # a sweep folder
    print(markdown_table(runs))            # sorted by final validation loss, best first
    plot_loss_curves(runs, "curves.png")   # train and validation loss against tokens

A run that is still going, crashed, or never evaluated still gets a row: what is missing is
shown as "-" and explained in `RunSummary.notes`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from tinyllama.config import split_unknown
from tinyllama.errors import DataError
from tinyllama.inspection import count_parameters
from tinyllama.model.config import LlamaConfig
from tinyllama.run_record import CONFIG, first_overrides, read_summary

METRICS = "metrics.jsonl"


@dataclass
class RunSummary:
    """What one run folder says about its run; None where the folder does not say it."""

    path: Path
    name: str
    """Label in tables and legends: the folder's path relative to the folders compared."""
    overrides: List[str] = field(default_factory=list)
    """Command-line overrides (key=value) that started the run, from launches.jsonl."""
    parameters: Optional[int] = None
    """Parameter count of the model in config.yaml (tied embeddings counted once)."""
    tokens: Optional[int] = None
    """Training tokens seen at the last training line."""
    train_loss: Optional[float] = None
    """Mean training loss of the last logged window."""
    val_loss: Optional[float] = None
    """Validation loss of the last evaluation."""
    tok_per_s: Optional[float] = None
    """Training tokens per second over the whole run (tokens / wall_s)."""
    wall_s: Optional[float] = None
    """Seconds between the first and the last training line's windows (the training loop's time)."""
    train_curve: List[Tuple[int, float]] = field(default_factory=list)
    """(tokens, loss) per training line."""
    val_curve: List[Tuple[int, float]] = field(default_factory=list)
    """(tokens, val_loss) per evaluation line."""
    pruned: bool = False
    """A search stopped the run early (summary.json "pruned"): its losses are not final ones."""
    notes: List[str] = field(default_factory=list)
    """Why a figure is missing (no config.yaml, a partial last line, no evaluation yet...)."""


def find_run_dirs(paths: Iterable[os.PathLike]) -> List[Path]:
    """Each path is a run folder or a sweep folder (runs/<name>/ holding runs/<name>/<job>/),
    searched recursively: a folder is listed with every run folder inside it. Raises
    DataError naming the path when it holds no run folder."""
    found: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise DataError(
                f"{path}: no such folder; pass run folders (runs/<name>) or a sweep "
                f"folder (runs/<sweep name>)"
            )
        runs = sorted(
            {
                p.parent
                for p in path.rglob("*")
                if p.name in (METRICS, CONFIG) and not _inside_a_run(p.relative_to(path))
            },
            key=_natural_key,
        )
        if not runs:
            raise DataError(
                f"{path}: no run folder inside (a run folder holds {CONFIG} and "
                f"{METRICS}); did the run or sweep start?"
            )
        found.extend(r for r in runs if r not in found)
    return found


def _inside_a_run(relative: Path) -> bool:
    """Hydra's .hydra/ snapshot and checkpoints/ hold a config.yaml but are not run folders."""
    return any(part.startswith(".") or part == "checkpoints" for part in relative.parts[:-1])


def _natural_key(path: Path) -> List[object]:
    """Sort sweep jobs 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in str(path).replace("_", "/").split("/")]


def load_runs(paths: Iterable[os.PathLike]) -> List[RunSummary]:
    """find_run_dirs + load_run, with names relative to the folders' common parent."""
    dirs = find_run_dirs(paths)
    root = Path(os.path.commonpath([d.resolve() for d in dirs])) if len(dirs) > 1 else None
    names = [str(d.resolve().relative_to(root)) if root else "." for d in dirs]
    return [load_run(d, name=d.name if name == "." else name) for d, name in zip(dirs, names)]


def load_run(path: os.PathLike, name: Optional[str] = None) -> RunSummary:
    """Summarise one run folder; never raises for missing or partial files (see `notes`)."""
    path = Path(path)
    run = RunSummary(path=path, name=name or path.name)
    _read_config(run)
    _read_overrides(run)
    _read_metrics(run)
    _read_summary(run)
    return run


def _read_summary(run: RunSummary) -> None:
    run.pruned = bool((read_summary(run.path) or {}).get("pruned"))


def _read_config(run: RunSummary) -> None:
    if not (run.path / CONFIG).is_file():
        run.notes.append(f"no {CONFIG}: parameter count unknown")
        return
    try:
        # Keys this version no longer has are dropped, as the checkpoint loader does.
        model, _ = split_unknown(
            OmegaConf.to_container(OmegaConf.load(run.path / CONFIG)["model"]), LlamaConfig
        )
        config = LlamaConfig(**model)
        run.parameters = count_parameters(config)["total"]
    except Exception as e:  # an older or hand-edited config: still show the run's losses
        run.notes.append(f"{CONFIG}: model section unreadable ({type(e).__name__}: {e})")


def _read_overrides(run: RunSummary) -> None:
    run.overrides = first_overrides(run.path)


def _read_metrics(run: RunSummary) -> None:
    path = run.path / METRICS
    if not path.is_file():
        run.notes.append(f"no {METRICS}: the run has not logged a step yet")
        return
    train, evals = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; the rest is still good.
            run.notes.append(f"{METRICS} line {number} is not JSON (partial write?); skipped")
            continue
        if "loss" in record and "tokens" in record:
            train.append(record)
        elif "val_loss" in record:
            evals.append(record)
    if not train:
        run.notes.append(f"{METRICS}: no training line yet")
        return
    run.train_curve = [(r["tokens"], r["loss"]) for r in train]
    run.tokens, run.train_loss = train[-1]["tokens"], train[-1]["loss"]
    run.wall_s = _wall_seconds(train)
    if run.wall_s:
        run.tok_per_s = (run.tokens - _tokens_before_first_window(train)) / run.wall_s
    # Evaluation lines carry steps; training lines map steps to tokens (constant per step).
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"]
    run.val_curve = [(r.get("tokens", round(r["step"] * tokens_per_step)), r["val_loss"]) for r in evals]
    if evals:
        run.val_loss = evals[-1]["val_loss"]
    else:
        run.notes.append("no evaluation yet: validation loss unknown")


def _tokens_before_first_window(train: Sequence[dict]) -> float:
    """Tokens already counted when the first logged window started (log_every steps earlier)."""
    first = train[0]
    if len(train) > 1:
        per_line = train[1]["tokens"] - first["tokens"]
        return max(0.0, first["tokens"] - per_line)
    return 0.0


def _wall_seconds(train: Sequence[dict]) -> Optional[float]:
    """Each line's tok_per_s covers its window of tokens, so window time = tokens / tok_per_s;
    their sum is the loop's wall time (evaluation and checkpoint pauses included)."""
    if any(not r.get("tok_per_s") for r in train):
        return None
    previous = _tokens_before_first_window(train)
    total = 0.0
    for r in train:
        total += (r["tokens"] - previous) / r["tok_per_s"]
        previous = r["tokens"]
    return total


# ---------------------------------------------------------------------------- the table


def _human(n: Optional[float]) -> str:
    """1234567 -> 1.23M (parameters, tokens)."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes else f"{seconds:.1f}s"


def _loss(x: Optional[float]) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4f}"


def sort_by_val_loss(runs: Sequence[RunSummary]) -> List[RunSummary]:
    """Best (lowest) final validation loss first; runs without one last, by name."""
    return sorted(
        runs, key=lambda r: (r.val_loss is None or math.isnan(r.val_loss), r.val_loss or 0.0, r.name)
    )


def common_overrides(runs: Sequence[RunSummary]) -> List[str]:
    """Overrides every run shares (with more than one run): listed once, under the table."""
    if len(runs) < 2:
        return []
    shared = set(runs[0].overrides).intersection(*(r.overrides for r in runs[1:]))
    return [o for o in runs[0].overrides if o in shared]


def markdown_table(runs: Sequence[RunSummary]) -> str:
    """The comparison table (Markdown), sorted by final validation loss, then notes on runs
    with missing figures. The overrides column shows what differs between the runs."""
    shared = set(common_overrides(runs))
    lines = [
        "| run | overrides | parameters | tokens | train loss | val loss | tokens/s | wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sort_by_val_loss(runs):
        overrides = " ".join(f"`{o}`" for o in r.overrides if o not in shared) or "-"
        tok_s = "-" if r.tok_per_s is None else f"{r.tok_per_s:,.0f}"
        name = f"{r.name} (pruned)" if r.pruned else r.name
        lines.append(
            f"| {name} | {overrides} | {_human(r.parameters)} | {_human(r.tokens)} "
            f"| {_loss(r.train_loss)} | {_loss(r.val_loss)} | {tok_s} | {_duration(r.wall_s)} |"
        )
    if shared:
        lines += ["", "Overrides common to every run: " + " ".join(f"`{o}`" for o in sorted(shared))]
    notes = [f"- {r.name}: {note}" for r in runs for note in r.notes]
    if notes:
        lines += ["", "Missing figures:", *notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the plot


def plot_loss_curves(runs: Sequence[RunSummary], out_path: os.PathLike, title: Optional[str] = None) -> Path:
    """Two panels, training and validation loss against training tokens, one colour per run
    (the same in both panels), labelled with its name and the overrides that differ. Writes a
    PNG and returns its path; raises DataError when no run has a single logged loss to draw."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display (servers, CI)
    import matplotlib.pyplot as plt

    drawable = [r for r in sort_by_val_loss(runs) if r.train_curve or r.val_curve]
    if not drawable:
        raise DataError(
            "no run has logged a loss yet: nothing to plot "
            "(metrics.jsonl is missing or empty in every run folder)"
        )
    shared = set(common_overrides(drawable))
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, r in enumerate(drawable):
        color = f"C{i % 10}"
        label = " ".join(
            [r.name + (" (pruned)" if r.pruned else ""), *(o for o in r.overrides if o not in shared)]
        )
        if r.train_curve:
            ax_train.plot(*zip(*r.train_curve), color=color, lw=1.2, label=label)
        if r.val_curve:
            ax_val.plot(
                *zip(*r.val_curve),
                color=color,
                lw=1.5,
                marker="o",
                ms=3,
                label=label,
                ls=":" if r.pruned else "-",
            )
    for ax, what in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_title(what)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("cross-entropy (nats/token)")
    ax_val.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
