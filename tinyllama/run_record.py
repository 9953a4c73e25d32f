"""What a run folder records about how it was launched: `config.yaml` and `launches.jsonl`.

    config.yaml     the fully resolved config of the latest launch (the run folder contract)
    summary.json    the figures of a launch that reached its end (or was pruned by a search)
    launches.jsonl  one JSON object per launch that ran, appended: its command-line overrides,
                    when it started, the step it resumed from, the device and the precision
                    `auto` resolved to. A resumed run so still shows how it first began.

Both are written only once a launch has passed every check (config, resume, tokenizer), so a
refused command leaves an existing run folder byte-identical. Hydra writes nothing into run
folders (configs/train.yaml sets `hydra.output_subdir: null`): its `.hydra/` snapshot would be
rewritten before any check could refuse the command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

LAUNCHES = "launches.jsonl"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
# Folders of runs made before launches.jsonl existed hold Hydra's snapshot instead.
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


def record_launch(run_dir: Path, job: Any, overrides: Sequence[str], **facts: Any) -> None:
    """Write config.yaml (the resolved `job`, a dataclass) and append this launch to
    launches.jsonl. `facts` are JSON-serialisable extras (resumed_from_step, precision, ...)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {key}: {value}\n" for key, value in facts.items())
    (run_dir / CONFIG).write_text(
        "# The resolved config of the latest launch; launches.jsonl lists every launch.\n"
        + header
        + OmegaConf.to_yaml(OmegaConf.structured(job)),
        encoding="utf-8",
    )
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": list(overrides), **facts}
    with (run_dir / LAUNCHES).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_launches(run_dir: Path) -> List[Dict[str, Any]]:
    """Every launch recorded in `run_dir`, oldest first; a partial last line is skipped."""
    path = Path(run_dir) / LAUNCHES
    if not path.is_file():
        return []
    launches = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            launches.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return launches


def first_overrides(run_dir: Path) -> List[str]:
    """The command-line overrides the run was started with (its first launch), or Hydra's
    .hydra/overrides.yaml for a folder made before launches were recorded; [] if neither."""
    launches = read_launches(run_dir)
    if launches:
        return [str(o) for o in launches[0].get("overrides", [])]
    legacy = Path(run_dir) / HYDRA_OVERRIDES
    return [str(o) for o in OmegaConf.load(legacy)] if legacy.is_file() else []


def write_summary(run_dir: Path, summary: Dict[str, Any]) -> None:
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def read_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    """summary.json of `run_dir`, or None while the run has none (running, crashed, stopped by
    a signal) or it is unreadable."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None
