"""The Optuna side of a search: settings, storage, sampler and pruner, the study itself, and
what a finished trial leaves behind (its state in the study, `best.yaml`).

Everything here takes plain values (no Hydra), so the sweeper plugin
(hydra_plugins/tinyllama_search) and the trial's reporting hook (trial.py) build the same
storage, sampler and pruner from the same `hydra.sweeper` settings.

A study is persistent and shared: its trials live in the storage (sqlite file by default), so
any number of copies of the search command, started at once or one after another, on one
machine or on several that reach the same storage, ask it for trials until it holds
`n_trials` of them. Each running trial's process records a heartbeat; a RUNNING trial whose
heartbeat stopped (its process was killed) is marked FAIL by the next copy that starts.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import yaml

from tinyllama.atomic import write_text_atomic
from tinyllama.errors import ConfigError
from tinyllama.run_record import SUMMARY, read_summary

STUDY_DB = "study.db"
BEST = "best.yaml"
SEARCH_SPACE_ATTR = "search_space"  # study user attribute: the distributions, as JSON strings
OBJECTIVE_ATTR = "objective"
ERROR_ATTR = "error"  # trial user attribute: why a failed trial failed
# hydra.sweeper.sampler.name / pruner.name -> the Optuna class (in optuna.samplers / optuna.pruners,
# looked up when a search starts, so Hydra's plugin discovery never imports Optuna).
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "qmc": "QMCSampler"}
PRUNERS = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "none": "NopPruner",
}


@dataclass
class StudySettings:
    """`hydra.sweeper` keys other than `params` and `_target_` (configs/hydra/sweeper/study.yaml)."""

    study_name: str
    """Name of the study in the storage (default: run.name)."""
    storage: Optional[str] = None
    """Any Optuna storage URL (sqlite:///..., postgresql://user@host/db, or the path of a journal
    file ending in .log for shared file systems); None: sqlite:///runs/<name>/study.db."""
    n_trials: int = 20
    """The study's total number of trials (all states): copies of the command stop there."""
    n_jobs: int = 1
    """Trials this copy launches together through hydra/launcher (joblib, submitit...)."""
    objective: str = "final_val_loss"
    """The summary.json key a trial's value is read from (final_val_loss, tok_per_s, ...)."""
    direction: str = "minimize"
    """minimize or maximize the objective."""
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    """name (tpe, random, grid, qmc), seed, and the sampler's own keyword arguments."""
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    """name (median, percentile, hyperband, successive_halving, none) and its keyword arguments."""
    heartbeat_interval: int = 30
    """Seconds between a running trial's heartbeats (sqlite/RDB storages)."""
    grace_period: Optional[int] = None
    """Seconds without a heartbeat after which a RUNNING trial counts as killed (None: 2 x interval)."""

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "StudySettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"unknown hydra.sweeper keys: {', '.join(unknown)}; the study sweeper "
                f"takes {', '.join(sorted(names | {'params'}))}"
            )
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        problems = []
        if self.direction not in ("minimize", "maximize"):
            problems.append(f"direction={self.direction!r}: choose minimize or maximize")
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            problems.append(f"n_trials={self.n_trials!r}: the study's total, at least 1")
        if not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            problems.append(f"n_jobs={self.n_jobs!r}: at least 1")
        if self.heartbeat_interval < 1:
            problems.append(f"heartbeat_interval={self.heartbeat_interval!r}: at least 1 second")
        for kind, spec, names in (("sampler", self.sampler, SAMPLERS), ("pruner", self.pruner, PRUNERS)):
            if spec.get("name") not in names:
                problems.append(f"{kind}.name={spec.get('name')!r}: choose one of {', '.join(names)}")
        if problems:
            raise ConfigError("bad search settings (hydra.sweeper):\n  " + "\n  ".join(problems))


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's notices about what this module uses on purpose: heartbeats (flagged
    experimental) with ask/tell rather than Study.optimize."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / STUDY_DB).resolve()}"


def open_storage(url: str, settings: StudySettings) -> Any:
    """An Optuna storage for `url` (RDB with heartbeats, or a journal file); raises ConfigError
    naming the URL when it cannot be reached."""
    import optuna

    try:
        if "://" not in url:  # a file path: Optuna's journal, safe on network file systems
            from optuna.storages.journal import JournalFileBackend

            if not Path(url).parent.is_dir():
                raise FileNotFoundError(f"no folder {Path(url).parent}")
            return optuna.storages.JournalStorage(JournalFileBackend(url))
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).parent.is_dir():
            raise FileNotFoundError(f"no folder {Path(url[len('sqlite:///') :]).parent}")
        with quiet_optuna():
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period,
            )
    except Exception as e:  # a driver missing, a server down, a folder missing...
        raise ConfigError(
            f"cannot open the study storage {url!r}: {type(e).__name__}: {e}\n"
            "check hydra.sweeper.storage (an Optuna storage URL, e.g. "
            "sqlite:///path/study.db or postgresql://user@host/db)"
        ) from e


def make_sampler(spec: Dict[str, Any], search_space: Dict[str, Any], trial_number: int) -> Any:
    """The sampler for the trial about to be asked. Seeding it with seed + trial number makes
    concurrent copies of the command propose different points (the same seed everywhere would
    make their random start-up trials identical) and keeps a study reproducible. The grid is
    the exception: its seed shuffles the grid, whose order every copy must share."""
    import optuna

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if kwargs.get("seed") is not None and name != "grid":
        kwargs["seed"] = int(kwargs["seed"]) + trial_number
    args = (grid_of(search_space),) if name == "grid" else ()
    try:
        with quiet_optuna():  # QMCSampler announces itself as experimental
            return getattr(optuna.samplers, SAMPLERS[name])(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"hydra.sweeper.sampler ({name}): {e}") from e


def grid_of(search_space: Dict[str, Any]) -> Dict[str, List[Any]]:
    """Every point of each distribution (choices, or integer/stepped ranges) for GridSampler."""
    import numpy as np
    from optuna.distributions import CategoricalDistribution

    grid, problems = {}, []
    for key, dist in search_space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif getattr(dist, "step", None) is not None and not getattr(dist, "log", False):
            grid[key] = [type(dist.low)(v) for v in np.arange(dist.low, dist.high + dist.step / 2, dist.step)]
        else:
            problems.append(key)
    if problems:
        raise ConfigError(
            f"the grid sampler needs choice(...) or range(...) for every key; "
            f"{', '.join(problems)} is a continuous interval"
        )
    return grid


def make_pruner(spec: Dict[str, Any]) -> Any:
    import optuna

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        return getattr(optuna.pruners, PRUNERS[spec["name"]])(**kwargs)
    except TypeError as e:
        raise ConfigError(f"hydra.sweeper.pruner ({spec['name']}): {e}") from e


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Serialise the copies of the command on this machine while they create the study or ask
    for a trial (flock on the sweep folder itself: no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def space_as_json(search_space: Dict[str, Any]) -> Dict[str, str]:
    from optuna.distributions import distribution_to_json

    return {k: distribution_to_json(d) for k, d in sorted(search_space.items())}


def open_study(storage: Any, settings: StudySettings, search_space: Dict[str, Any], pruner: Any) -> Any:
    """Create the study or load it; refuse an existing one whose search space, objective or
    direction differ (its trials would not be comparable), before any trial runs."""
    import optuna

    wanted = {
        SEARCH_SPACE_ATTR: space_as_json(search_space),
        OBJECTIVE_ATTR: f"{settings.direction} {settings.objective}",
    }
    study = optuna.create_study(
        storage=storage,
        study_name=settings.study_name,
        pruner=pruner,
        direction=settings.direction,
        load_if_exists=True,
    )
    held = study.user_attrs
    if not held.get(SEARCH_SPACE_ATTR) and not study.get_trials(deepcopy=False):
        for key, value in wanted.items():  # a new study (or one created but never asked)
            study.set_user_attr(key, value)
        return study
    diffs = [
        f"  {k}: the study has {held.get(k)!r}, this command {v!r}"
        for k, v in wanted.items()
        if held.get(k) != v
    ]
    direction = study.direction.name.lower()
    if direction != settings.direction:
        diffs.append(f"  direction: the study has {direction}, this command {settings.direction}")
    if diffs:
        raise ConfigError(
            f"study {settings.study_name!r} already exists with a different "
            "search:\n" + "\n".join(diffs) + "\ncontinue it with its own search "
            "space, or start another run.name (nothing was changed)"
        )
    return study


def count_states(study: Any) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


@contextmanager
def heartbeats(storage: Any, trial_ids: Sequence[int], interval: int) -> Iterator[None]:
    """Record a heartbeat for each trial now and every `interval` seconds until the block ends,
    so other copies can tell a trial running here from one left by a killed process."""
    if not hasattr(storage, "record_heartbeat"):  # journal storage: no heartbeats
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name="study-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def read_outcome(run_dir: Path, objective: str) -> Dict[str, Any]:
    """What a trial's run folder says: {"state": COMPLETE/PRUNED/FAIL, "value", "error"};
    "interrupted" when it has no summary (the search stops: rerun the command to continue)."""
    path = run_dir / SUMMARY
    summary = read_summary(run_dir)
    if summary is None:
        return {
            "state": "FAIL",
            "interrupted": True,
            "error": f"no readable {path}: the run stopped before its end (interrupted by a signal?)",
        }
    if summary.get("pruned"):
        return {"state": "PRUNED"}  # Optuna keeps its last reported validation loss
    if objective not in summary:
        raise ConfigError(
            f"hydra.sweeper.objective={objective!r} is not in {path} (it has "
            f"{', '.join(sorted(summary))}): choose one of those keys"
        )
    value = summary[objective]
    if value is None or not math.isfinite(float(value)):
        return {"state": "FAIL", "error": f"{objective} is {value} (the run diverged?)"}
    return {"state": "COMPLETE", "value": float(value)}


def tell(study: Any, trial: Any, outcome: Dict[str, Any]) -> None:
    import optuna
    from optuna.trial import TrialState

    # Samplers are made anew for each ask (make_sampler); GridSampler's after-trial hook would
    # call study.stop(), which only works inside Study.optimize. A plain sampler takes the tell.
    study.sampler = optuna.samplers.RandomSampler()

    if outcome.get("error"):
        trial.set_user_attr(ERROR_ATTR, outcome["error"])
    state = TrialState[outcome["state"]]
    study.tell(trial, outcome.get("value") if state == TrialState.COMPLETE else None, state=state)


def write_best(
    study: Any,
    sweep_dir: Path,
    fixed: Dict[str, Any],
    groups: Dict[str, str],
    storage_url: str,
    objective: str,
) -> Optional[Path]:
    """runs/<name>/best.yaml: the best complete trial as an experiment (`@package _global_`):
    the search command's own settings (`fixed`: dotted keys; `groups`: config-group choices such
    as model=tiny, experiment=cpu_quick) and the trial's params, taken from the study. None
    while no trial has completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    values: Dict[str, Any] = {}
    # Hydra wants included configs first, then the overrides of group choices.
    defaults: List[Any] = [f"/experiment/{groups['experiment']}"] if "experiment" in groups else []
    defaults += [{f"override /{k}": v} for k, v in sorted(groups.items()) if k != "experiment"]
    if defaults:
        values["defaults"] = [*defaults, "_self_"]
    for key, value in {**fixed, **best.params}.items():
        _set_dotted(values, key, value)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(count_states(study).items()))
    name = study.study_name
    header = (
        f"# @package _global_\n"
        f"# Best trial of the Optuna study {name!r} ({storage_url}): trial {best.number}, "
        f"{objective} = {best.value:.6g}\n# (of {counts} trials). Run it as an experiment:\n"
        f"#   cp {sweep_dir}/{BEST} configs/experiment/{name}_best.yaml\n"
        f"#   python train.py experiment={name}_best run.name={name}_best\n"
    )
    path = sweep_dir / BEST
    write_text_atomic(path, header + yaml.safe_dump(values, sort_keys=False))
    return path


def _set_dotted(tree: Dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value
