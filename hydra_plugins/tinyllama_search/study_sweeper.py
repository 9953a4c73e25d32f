"""`hydra.sweeper` for tinyllama's searches: a persistent, shared, pruning Optuna study.

    python train.py hparams_search=optuna_lr run.name=lr_search   # any number of copies at once

Selected by `override /hydra/sweeper: study` (configs/hydra/sweeper/study.yaml). Hydra only
loads sweepers defined under the `hydra_plugins` package, hence this module's place; the
Optuna side (storage, sampler, pruner, outcomes, best.yaml) is tinyllama.search.study.

Each trial is asked from the study (ask/tell), launched through the configured hydra/launcher
as job number = trial number (run folder runs/<name>/<trial number>/), and told what its run
folder's summary.json says. Optuna is imported only when a search starts: Hydra imports this
module on every launch to discover its plugins.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from tinyllama.errors import ConfigError, TinyLlamaError
from tinyllama.search import study as st

# Keys that name the search itself, not the trial: left out of best.yaml.
NOT_REPRODUCED = ("run.name", "run.dir", "logger.group", "hparams_search")
_MISSING = object()


class StudySweeper(Sweeper):
    """Hydra instantiates it with the `hydra.sweeper` node: `params` (the search space, in
    Hydra's sweep syntax; plain values are fixed overrides) and the StudySettings keys."""

    def __init__(self, params: Optional[DictConfig] = None, **settings: Any) -> None:
        self.params = _flatten(OmegaConf.to_container(params, resolve=True) if params else {})
        self.settings_values = settings

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: List[str]) -> None:
        try:
            self._sweep(arguments)
        except TinyLlamaError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    # ---- before any trial: everything checked once --------------------------------------
    def _sweep(self, arguments: List[str]) -> None:
        settings = st.StudySettings.from_dict(dict(self.settings_values))
        space, fixed, groups, plain_args = self._search_space(arguments)
        st.make_sampler(settings.sampler, space, 0)  # a bad sampler argument fails here
        pruner = st.make_pruner(settings.pruner)
        if settings.sampler["name"] == "grid":
            settings.n_trials = min(settings.n_trials, math.prod(len(v) for v in st.grid_of(space).values()))
        url = settings.storage or st.default_storage(self.sweep_dir)
        study, storage = self._open(url, settings, space, pruner)
        counts = st.count_states(study)
        print(
            f"study {settings.study_name!r} ({url}): {sum(counts.values())} of "
            f"{settings.n_trials} trials so far {counts or ''}",
            flush=True,
        )

        def write_best() -> Optional[Path]:  # locked: copies must not write an older best last
            with st.locked(self.sweep_dir):
                return st.write_best(study, self.sweep_dir, fixed, groups, url, settings.objective)

        _Runner(self, study, storage, settings, space, plain_args, write_best).run()
        best = write_best()
        counts = st.count_states(study)
        print(
            f"study {settings.study_name!r}: {counts}; "
            + (
                f"best trial {study.best_trial.number} ({settings.objective} = "
                f"{study.best_value:.6g}), {best}"
                if best
                else "no trial completed"
            ),
            flush=True,
        )

    def _search_space(
        self, arguments: Sequence[str]
    ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, str], List[str]]:
        """(distributions, fixed values, group choices, the non-sweep overrides every trial gets).
        The command line (python train.py -m hparams_search=... 'optim.lr=choice(1e-3,3e-3)')
        wins over hydra.sweeper.params: its sweeps join or replace theirs, its values fix a key."""
        parser = OverridesParser.create()
        from_params = parser.parse_overrides([_as_override(k, v) for k, v in self.params.items()])
        from_args = parser.parse_overrides(list(arguments))
        choices = OmegaConf.to_container(self.config.hydra.runtime.choices)
        space: Dict[str, Any] = {}
        fixed: Dict[str, Any] = {}
        groups: Dict[str, str] = {}
        plain_args: List[str] = []
        unknown = []
        for override in [*from_params, *from_args]:  # later ones win
            key = override.get_key_element()
            plain_args = [a for a in plain_args if _key(a) != key]
            if override.is_sweep_override():
                space[key] = _distribution(override)
                fixed.pop(key, None)
            elif key in choices:
                groups[key] = str(override.value())
            else:
                fixed[key] = override.value()
                space.pop(key, None)  # a fixed value on the command line ends that search
            if not override.is_sweep_override():  # every trial gets it (logger.group=<name>...)
                plain_args.append(override.input_line)
            if (
                key not in choices
                and OmegaConf.select(self.config, key, default=_MISSING, throw_on_resolution_failure=False)
                is _MISSING
                and not override.is_add()
            ):
                unknown.append(key)
        if unknown:
            raise ConfigError(
                f"search keys not in the config: {', '.join(unknown)}; see "
                "tinyllama/config.py for the keys each group takes (a misspelling?)"
            )
        if not space:
            raise ConfigError(
                "nothing to search: hydra.sweeper.params has no sweep (e.g. "
                "optim.lr: tag(log, interval(1e-4, 1e-2)))"
            )
        fixed = {k: v for k, v in fixed.items() if k not in NOT_REPRODUCED}
        groups = {k: v for k, v in groups.items() if k not in NOT_REPRODUCED}
        return space, fixed, groups, plain_args

    def _open(
        self, url: str, settings: st.StudySettings, space: Dict[str, Any], pruner: Any
    ) -> Tuple[Any, Any]:
        default = settings.storage is None
        if default and not Path(url[len("sqlite:///") :]).exists():
            trials = [p.name for p in self.sweep_dir.glob("*") if p.name.isdigit()]
            if trials:
                raise ConfigError(
                    f"{self.sweep_dir} already holds run folders {', '.join(sorted(trials))} but "
                    f"no {st.STUDY_DB}: they are not this study's trials (a grid sweep of the "
                    "same run.name?). Pick another run.name (nothing was changed)"
                )
        new = [d for d in (self.sweep_dir, *self.sweep_dir.parents) if not d.exists()]
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            # Two copies started at once would race to create the tables and the study.
            with st.locked(self.sweep_dir):
                storage = st.open_storage(url, settings)
                return st.open_study(storage, settings, space, pruner), storage
        except ConfigError:
            for folder in new:  # a refused command leaves nothing behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise


class _Runner:
    """Ask, launch, tell, until the study holds n_trials trials."""

    def __init__(
        self,
        sweeper: StudySweeper,
        study: Any,
        storage: Any,
        settings: st.StudySettings,
        space: Dict[str, Any],
        args: List[str],
        write_best: Callable[[], Optional[Path]],
    ) -> None:
        self.sweeper, self.study, self.storage, self.settings = sweeper, study, storage, settings
        self.space, self.args, self.write_best = space, args, write_best
        self.trial_ids: Dict[int, int] = {}  # trial number -> storage id, looked up once

    def run(self) -> None:
        while True:
            batch = self._ask()
            if not batch:
                return
            if not self._launch(batch):
                return  # interrupted: the same command continues the study

    def _ask(self) -> List[Any]:
        from optuna.storages import fail_stale_trials

        s = self.settings
        with st.locked(self.sweeper.sweep_dir), st.quiet_optuna():  # count and ask as one step
            fail_stale_trials(self.study)  # RUNNING trials whose process stopped beating
            total = len(self.study.get_trials(deepcopy=False))
            batch: List[Any] = []
            while total + len(batch) < s.n_trials and len(batch) < s.n_jobs:
                self.study.sampler = st.make_sampler(s.sampler, self.space, total + len(batch))
                trial = self.study.ask(self.space)
                if trial.number >= s.n_trials:  # another machine asked first: not ours to run
                    st.tell(
                        self.study,
                        trial,
                        {
                            "state": "FAIL",
                            "error": "surplus trial: the study already had n_trials when it was asked",
                        },
                    )
                    break
                self.trial_ids[trial.number] = self._trial_id(trial)
                batch.append(trial)
        return batch

    def _trial_id(self, trial: Any) -> int:
        study_id = self.storage.get_study_id_from_name(self.settings.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)

    def _groups(self, batch: List[Any]) -> List[List[Any]]:
        """The launches that run the batch. The launcher numbers its jobs from initial_job_idx,
        so one launch holds a run of consecutive trial numbers. Hydra's basic launcher runs its
        jobs one after another in this process, where one trial's refused config (sys.exit)
        would abort the rest of the launch: it gets one trial per launch."""
        numbers = [t.number for t in batch]
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(batch)))
        basic = type(self.sweeper.launcher).__name__ == "BasicLauncher"
        return [batch] if consecutive and not basic else [[t] for t in batch]

    def _launch(self, batch: List[Any]) -> bool:
        """Run the batch; False when a trial was interrupted (stop the search). Every trial of
        the batch beats until the batch ends, so a trial waiting for its launch is not taken
        for one a killed process left behind."""
        ids = [self.trial_ids[t.number] for t in batch]
        with st.heartbeats(self.storage, ids, self.settings.heartbeat_interval):
            for group in self._groups(batch):
                if not self._launch_group(group, batch):
                    return False
        return True

    def _launch_group(self, group: List[Any], batch: List[Any]) -> bool:
        jobs = [self.args + [_as_override(k, v) for k, v in t.params.items()] for t in group]
        for t, job in zip(group, jobs):
            print(f"trial {t.number}: {' '.join(job[len(self.args) :])}", flush=True)
        try:
            returns = self.sweeper.launcher.launch(jobs, initial_job_idx=group[0].number)
        except SystemExit as e:  # the trial's CLI refused its config (message printed above)
            returns = [e] * len(group)
        except BaseException:
            self._fail_running(batch, "interrupted (KeyboardInterrupt)")
            raise
        for t, ret in zip(group, returns):
            outcome = self._outcome(ret)
            self._finish(t, outcome)
            if outcome.get("interrupted"):
                self._fail_running(batch, "interrupted")
                return False
        return True

    def _outcome(self, ret: Any) -> Dict[str, Any]:
        if isinstance(ret, SystemExit):
            return {
                "state": "FAIL",
                "error": f"the trial exited with status {ret.code} (its error message is printed above)",
            }
        assert isinstance(ret, JobReturn)
        if ret.status == JobStatus.FAILED:
            try:
                _ = ret.return_value  # re-raises the trial's exception
            except Exception as e:
                return {"state": "FAIL", "error": f"{type(e).__name__}: {e}"}
        run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
        return st.read_outcome(run_dir, self.settings.objective)

    def _finish(self, trial: Any, outcome: Dict[str, Any]) -> None:
        st.tell(self.study, trial, outcome)
        detail = outcome.get("error") or f"{self.settings.objective} = {outcome.get('value')}"
        if outcome["state"] == "PRUNED":
            frozen = self.storage.get_trial(self.trial_ids[trial.number])
            step = frozen.last_step
            detail = f"at step {step}, validation loss {frozen.intermediate_values.get(step)}"
        print(f"trial {trial.number}: {outcome['state']} ({detail})", flush=True)
        self.write_best()

    def _fail_running(self, trials: List[Any], why: str) -> None:
        from optuna.trial import TrialState

        for t in trials:
            frozen = self.storage.get_trial(self.trial_ids[t.number])
            if frozen.state == TrialState.RUNNING:
                st.tell(self.study, t, {"state": "FAIL", "error": why})


def _key(override_line: str) -> str:
    return override_line.split("=", 1)[0].lstrip("+~")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optim": {"lr": x}} and {"optim.lr": x} alike -> {"optim.lr": x}."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_override(key: str, value: Any) -> str:
    """key=value as Hydra parses it back: strings quoted unless they are a sweep expression."""
    if isinstance(value, str) and not _is_sweep_text(value):
        return f"{key}='{value}'" if any(c in value for c in " ,()[]{}:'=") else f"{key}={value}"
    return f"{key}={value}"


def _is_sweep_text(value: str) -> bool:
    return value.startswith(("choice(", "range(", "interval(", "tag(")) or "," in value


def _distribution(override: Override) -> Any:
    """Hydra sweep syntax -> Optuna distribution: choice(a, b) or a,b -> categorical;
    range(start, stop, step=s) -> int (or float) with that step, stop excluded;
    interval(lo, hi) -> float, tag(log, ...) for a log scale, tag(int, ...) for integers."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, key = override.value(), override.get_key_element()
    tags = getattr(value, "tags", set()) or set()
    if isinstance(value, IntervalSweep):
        if "int" in tags:
            return IntDistribution(int(value.start), int(value.end), log="log" in tags)
        return FloatDistribution(value.start, value.end, log="log" in tags)
    if isinstance(value, RangeSweep):
        n = math.ceil((value.stop - value.start) / value.step)
        last = value.start + (n - 1) * value.step
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, last, step=value.step)
        return FloatDistribution(float(value.start), float(last), step=float(value.step))
    if override.is_choice_sweep():
        return CategoricalDistribution(list(value.list))
    raise ConfigError(
        f"{key}: {override.input_line!r} is not a search space Optuna takes (choice, range, interval)"
    )
