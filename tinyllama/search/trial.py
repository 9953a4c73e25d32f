"""The trial's side of a search: the hook through which a training run reports its in-run
validation losses to its Optuna trial and learns whether it is pruned.

The training loop only knows `on_eval(step, val_loss) -> bool` (True: stop here). This module
builds one for the trial a search launched, from the same `hydra.sweeper` settings the sweeper
used, so it works in the sweeper's process and in the processes of a parallel launcher alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

from tinyllama.search.study import StudySettings, default_storage, make_pruner, open_storage

EvalHook = Callable[[int, float], bool]


def eval_reporter(sweeper: Dict[str, Any], sweep_dir: Path, trial_number: int) -> EvalHook:
    """on_eval hook for trial `trial_number` of the study `sweeper` (the resolved hydra.sweeper
    node) describes; `sweep_dir` is absolute. The study is opened at the first report."""
    settings = StudySettings.from_dict({k: v for k, v in sweeper.items() if k not in ("_target_", "params")})
    trial: Optional[Any] = None

    def report(step: int, val_loss: float) -> bool:
        nonlocal trial
        if trial is None:
            trial = _open_trial(settings, sweep_dir, trial_number)
        trial.report(val_loss, step)
        return trial.should_prune()

    return report


def _open_trial(settings: StudySettings, sweep_dir: Path, trial_number: int) -> Any:
    import optuna

    storage = open_storage(settings.storage or default_storage(sweep_dir), settings)
    study = optuna.load_study(
        study_name=settings.study_name, storage=storage, pruner=make_pruner(settings.pruner)
    )
    study_id = storage.get_study_id_from_name(settings.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, trial_number))
