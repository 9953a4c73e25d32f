"""The Optuna side of a search without training anything: settings are checked by name,
every sampler and pruner the settings offer builds, a study refuses another search space,
and a trial's run folder decides its outcome."""

from __future__ import annotations

import json

import pytest

optuna = pytest.importorskip("optuna", minversion="4.0")  # pip install -e ".[sweep]"
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402

from tinyllama.errors import ConfigError  # noqa: E402
from tinyllama.search import study as st  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed")  # ask/tell on purpose

SPACE = {
    "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
    "optim.warmup_steps": IntDistribution(0, 90, step=10),
}


def test_settings_name_what_is_wrong():
    with pytest.raises(ConfigError, match="unknown hydra.sweeper keys: n_trial"):
        st.StudySettings.from_dict({"study_name": "s", "n_trial": 3})
    with pytest.raises(ConfigError) as e:
        st.StudySettings.from_dict(
            {
                "study_name": "s",
                "direction": "down",
                "n_trials": 0,
                "sampler": {"name": "cma"},
                "pruner": {"name": "patient"},
            }
        )
    for part in ("direction='down'", "n_trials=0", "sampler.name='cma'", "pruner.name='patient'"):
        assert part in str(e.value)  # every problem at once


@pytest.mark.parametrize("name", st.SAMPLERS)
def test_every_sampler_builds(name):
    space = (
        SPACE
        if name != "grid"
        else {
            "optim.lr": CategoricalDistribution([1e-3, 3e-3]),
            "optim.warmup_steps": SPACE["optim.warmup_steps"],
        }
    )
    sampler = st.make_sampler({"name": name, "seed": 1}, space, trial_number=2)
    assert type(sampler) is getattr(optuna.samplers, st.SAMPLERS[name])
    with pytest.raises(ConfigError, match=f"sampler \\({name}\\)"):
        st.make_sampler({"name": name, "no_such_argument": 1}, space, 0)


def test_the_grid_lists_every_point_and_refuses_intervals():
    grid = st.grid_of({"a": IntDistribution(0, 90, step=10), "b": CategoricalDistribution(["x", "y"])})
    assert grid == {"a": list(range(0, 100, 10)), "b": ["x", "y"]}
    with pytest.raises(ConfigError, match="optim.lr"):
        st.grid_of(SPACE)


@pytest.mark.parametrize("name", st.PRUNERS)
def test_every_pruner_builds(name):
    needs = {"percentile": {"percentile": 25.0}}.get(name, {})  # its one required argument
    assert type(st.make_pruner({"name": name, **needs})) is getattr(optuna.pruners, st.PRUNERS[name])


def test_a_study_refuses_another_search_space_or_direction(tmp_path):
    settings = st.StudySettings(study_name="s", heartbeat_interval=1)
    storage = st.open_storage(f"sqlite:///{tmp_path / 'study.db'}", settings)
    study = st.open_study(storage, settings, SPACE, st.make_pruner({"name": "none"}))
    study.tell(study.ask(SPACE), 1.0)
    assert st.open_study(storage, settings, SPACE, None).study_name == "s"  # the same: continues
    other = {**SPACE, "optim.lr": FloatDistribution(1e-4, 1e-1, log=True)}
    with pytest.raises(ConfigError, match="different search:\n  search_space"):
        st.open_study(storage, settings, other, None)
    with pytest.raises(ConfigError, match="direction"):
        st.open_study(storage, st.StudySettings(study_name="s", direction="maximize"), SPACE, None)


def test_a_journal_file_is_a_storage(tmp_path):
    settings = st.StudySettings(study_name="j")
    study = st.open_study(st.open_storage(str(tmp_path / "study.log"), settings), settings, SPACE, None)
    study.tell(study.ask(SPACE), 2.0)
    assert (tmp_path / "study.log").stat().st_size > 0
    with pytest.raises(ConfigError, match="cannot open the study storage"):
        st.open_storage(str(tmp_path / "missing" / "study.log"), settings)


def test_the_run_folder_decides_the_outcome(tmp_path):
    assert st.read_outcome(tmp_path, "final_val_loss")["state"] == "FAIL"  # no summary: interrupted
    summary = {"final_val_loss": 2.5, "tok_per_s": 900.0, "pruned": False}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert st.read_outcome(tmp_path, "tok_per_s") == {"state": "COMPLETE", "value": 900.0}
    with pytest.raises(ConfigError, match="bits_per_byte.*not in"):
        st.read_outcome(tmp_path, "bits_per_byte")
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "pruned": True}))
    assert st.read_outcome(tmp_path, "tok_per_s")["state"] == "PRUNED"
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "final_val_loss": float("nan")}))
    assert st.read_outcome(tmp_path, "final_val_loss")["state"] == "FAIL"  # diverged


def test_best_yaml_is_an_experiment_that_composes_to_the_best_trial(tmp_path):
    from tinyllama.cli import compose_job

    study = optuna.create_study(study_name="s")
    for loss in (3.0, 2.0, 2.5):
        study.tell(study.ask({"optim.lr": FloatDistribution(1e-4, 1e-2, log=True)}), loss)
    best = study.best_trial
    path = st.write_best(
        study,
        tmp_path,
        {"train.max_steps": 7},
        {"experiment": "cpu_quick", "tokenizer": "bpe_512"},
        "sqlite://",
        "final_val_loss",
    )
    assert path.read_text().startswith("# @package _global_\n")
    experiment = tmp_path / "cfg" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "s_best.yaml").write_text(path.read_text())
    job = compose_job([f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "experiment=s_best"])
    assert job.optim.lr == best.params["optim.lr"] and job.train.max_steps == 7
    assert job.tokenizer.name == "bpe_512"  # over cpu_quick's own choice
    assert job.model.hidden_size == compose_job(["experiment=cpu_quick"]).model.hidden_size
