"""Recipes and sweeps: every shipped recipe and search composes and validates, and grid sweeps
run end to end through `python train.py -m`, one run folder per job, with the default,
joblib and submitit launchers; Optuna study searches (hparams_search=) run end to end too:
resumed, shared by concurrent copies, pruned, refused on bad input, surviving a crashed or a
killed trial."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tinyllama.cli import CONFIG_DIR, to_job
from tinyllama.compare import load_runs, markdown_table

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (REPO / "configs" / "hparams_search").glob("*.yaml"))


def _compose(overrides, hydra_node=False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_node)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe):
    job = to_job(_compose([f"experiment={recipe}"]))
    assert job.run.name == recipe and job.run.dir == f"runs/{recipe}"


@pytest.mark.parametrize("search", SEARCHES)
def test_search_composes_and_searches_real_keys(search):
    cfg = _compose([f"hparams_search={search}", "experiment=cpu_quick"], hydra_node=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.sweeper._target_.endswith(".StudySweeper")
    searched = cfg.hydra.sweeper.params
    assert {"optim.lr", "optim.warmup_steps", "optim.weight_decay"} <= set(searched)
    for key in searched:  # a misspelt key would only fail at the first trial
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    to_job(_compose([f"hparams_search={search}", "experiment=cpu_quick"]))


def _env() -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TINYLLAMA_JOB_DIR", None)
    return env


def _train(args, cwd: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == returncode, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _final_val_loss(run: Path) -> float:
    evals = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line
    ]
    return evals[-1]["val_loss"]


def test_grid_sweep_gives_each_job_its_own_run_folder(tiny_overrides, tmp_path):
    _train(["-m", "optim.lr=1e-3,3e-3", "run.name=grid", *tiny_overrides], tmp_path)
    sweep = tmp_path / "runs" / "grid"
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name != ".hydra")
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, ("0.001", "0.003")):  # as Hydra prints the swept values
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert (tmp_path / cfg["run"]["dir"]).resolve() == job.resolve()  # its own folder: no sharing
        assert cfg["optim"]["lr"] == float(lr)
        assert cfg["logger"]["group"] == "grid"  # one wandb group per sweep...
        assert f"optim.lr={lr}" in cfg["logger"]["run_name"]  # ...told apart by their overrides
        summary = json.loads((job / "summary.json").read_text())
        assert summary["final_val_loss"] == _final_val_loss(job)  # the value train_main returns
    assert not (sweep / "metrics.jsonl").exists()
    runs = load_runs([sweep])
    assert sorted(r.name for r in runs) == ["0", "1"]  # the jobs, not their .hydra/ snapshots
    table = markdown_table(runs)
    assert "`optim.lr=0.001`" in table and "`optim.lr=0.003`" in table


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, plugin", [("joblib", "hydra_joblib_launcher"), ("submitit_local", "hydra_submitit_launcher")]
)
def test_grid_sweep_runs_its_jobs_in_parallel_processes(tiny_overrides, tmp_path, launcher, plugin):
    """hydra/launcher=joblib (local processes) and submitit (submitit_slurm on a cluster,
    submitit_local here): the jobs still get numbered run folders of their own."""
    pytest.importorskip(f"hydra_plugins.{plugin}")
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    _train(
        ["-m", "optim.lr=1e-3,3e-3", "run.name=par", f"hydra/launcher={launcher}", *extra, *tiny_overrides],
        tmp_path,
    )
    sweep = tmp_path / "runs" / "par"
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        cfg = yaml.safe_load((sweep / job / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == lr and (tmp_path / cfg["run"]["dir"]).resolve() == sweep / job
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["final_val_loss"] == _final_val_loss(sweep / job)
    assert sorted(r.name for r in load_runs([sweep])) == ["0", "1"]  # .submitit/ logs are not runs


# ---------------------------------------------------------------------------- Optuna studies


def _has_optuna() -> bool:
    try:
        import optuna
    except ImportError:
        return False
    return int(optuna.__version__.split(".")[0]) >= 4


needs_optuna = pytest.mark.skipif(not _has_optuna(), reason='needs pip install -e ".[sweep]"')


def _search(name, tiny_overrides, *extra):
    return [
        "-m",
        "hparams_search=optuna_lr",
        f"run.name={name}",
        *tiny_overrides,
        "optim.warmup_steps=0",
        *extra,
    ]


def _trials(sweep: Path) -> list:
    import optuna

    storage = f"sqlite:///{sweep / 'study.db'}"
    return optuna.load_study(study_name=sweep.name, storage=storage).get_trials()


def _launched(output: str) -> list:
    """Trial numbers a copy of the search launched (its 'trial N: key=value ...' lines)."""
    return [int(m) for m in re.findall(r"^trial (\d+): \S+=", output, flags=re.M)]


@needs_optuna
@pytest.mark.slow
def test_study_resumes_to_n_trials_and_best_yaml_reproduces_the_best(tiny_overrides, tmp_path):
    args = _search("res", tiny_overrides, "model=tiny")
    first = _train([*args, "hydra.sweeper.n_trials=2"], tmp_path)
    sweep = tmp_path / "runs" / "res"
    trial0 = (sweep / "0" / "metrics.jsonl").read_bytes()
    second = _train([*args, "hydra.sweeper.n_trials=3"], tmp_path)
    assert _launched(first.stdout) == [0, 1] and _launched(second.stdout) == [2]
    assert (sweep / "0" / "metrics.jsonl").read_bytes() == trial0  # finished trials left alone
    trials = _trials(sweep)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:  # Optuna was told what each run folder's summary says
        assert t.value == json.loads((sweep / str(t.number) / "summary.json").read_text())["final_val_loss"]
    best = min(trials, key=lambda t: t.value)

    # best.yaml is an experiment: the search command's settings plus the best trial's params.
    experiment = tmp_path / "cfg" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "res_best.yaml").write_text((sweep / "best.yaml").read_text())
    assert (sweep / "best.yaml").read_text().startswith("# @package _global_")
    _train(
        [f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "experiment=res_best", "run.name=again"], tmp_path
    )
    trial_cfg = yaml.safe_load((sweep / "0" / "config.yaml").read_text())
    assert trial_cfg["logger"]["group"] == "res"  # hydra.sweeper.params' fixed values apply
    again = yaml.safe_load((tmp_path / "runs" / "again" / "config.yaml").read_text())
    assert again["optim"]["lr"] == best.params["optim.lr"]
    assert _final_val_loss(tmp_path / "runs" / "again") == best.value  # same seed: same run

    # The same study with another search space is refused before any trial, nothing changed.
    db = (sweep / "study.db").read_bytes()
    proc = _train([*args, "hydra.sweeper.n_trials=4", "optim.lr=choice(1e-3,2e-3)"], tmp_path, returncode=2)
    assert "already exists with a different search" in proc.stderr and "optim.lr" in proc.stderr
    assert (sweep / "study.db").read_bytes() == db and not (sweep / "3").exists()


@needs_optuna
@pytest.mark.slow
def test_two_copies_started_together_share_the_study(tiny_overrides, tmp_path):
    """No trial runs twice: each number is launched by one copy, and no two share a point."""
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        *_search("shared", tiny_overrides, "hydra.sweeper.n_trials=4"),
    ]
    copies = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [c.communicate(timeout=300) for c in copies]
    assert [c.returncode for c in copies] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    launched = [_launched(out) for out, _ in outputs]
    assert sorted(launched[0] + launched[1]) == [0, 1, 2, 3]
    trials = _trials(tmp_path / "runs" / "shared")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    assert all((tmp_path / "runs" / "shared" / str(n) / "summary.json").is_file() for n in range(4))


@needs_optuna
@pytest.mark.slow
def test_a_bad_learning_rate_is_pruned_at_an_evaluation(tiny_overrides, tmp_path):
    # Grid order is the sampler's (seeded); the median pruner needs one finished trial first.
    # This seed runs 2e-3, then 3e-3, then 3.0: without warmup the higher good lr has the lower loss
    # after 2 steps, so the median of the first trial prunes only the bad one.
    args = _search(
        "prune",
        tiny_overrides,
        "train.max_steps=6",
        "eval.every=2",
        "checkpoint.every=6",
        "hydra.sweeper.sampler.name=grid",
        "~hydra.sweeper.sampler.n_startup_trials",
        "hydra.sweeper.sampler.seed=3",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "optim.lr=choice(2e-3,3e-3,3.0)",
        "optim.warmup_steps=0",
        "optim.weight_decay=0.1",
    )
    _train(args, tmp_path)
    sweep = tmp_path / "runs" / "prune"
    trials = _trials(sweep)
    assert trials[0].params["optim.lr"] != 3.0, "the seed puts the bad lr first: pick another"
    bad = next(t for t in trials if t.params["optim.lr"] == 3.0)
    assert bad.state.name == "PRUNED" and sorted(bad.intermediate_values) == [2]
    summary = json.loads((sweep / str(bad.number) / "summary.json").read_text())
    assert summary["pruned"] is True
    evals = [
        json.loads(line)["step"]
        for line in (sweep / str(bad.number) / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    assert evals == [0, 2]  # stopped there: no later step was trained
    good = [t for t in trials if t is not bad]
    assert [t.state.name for t in good] == ["COMPLETE"] * 2
    assert sorted(good[0].intermediate_values) == [2, 4]  # reported at every eval.every
    assert f"| {bad.number} (pruned) |" in markdown_table(load_runs([sweep]))


@needs_optuna
@pytest.mark.slow
def test_a_crashing_trial_is_failed_with_its_error_and_the_study_goes_on(tiny_overrides, tmp_path):
    # 3 heads cannot share 2 key/value heads: that trial's config is refused when it starts.
    _train(
        _search(
            "crash",
            tiny_overrides,
            "hydra.sweeper.sampler.name=grid",
            "hydra.sweeper.n_trials=2",
            "~hydra.sweeper.sampler.n_startup_trials",
            "optim.lr=1e-3",
            "optim.weight_decay=0.1",
            "model.num_attention_heads=choice(4,3)",
        ),
        tmp_path,
    )
    trials = {t.params["model.num_attention_heads"]: t for t in _trials(tmp_path / "runs" / "crash")}
    assert trials[3].state.name == "FAIL" and "status 2" in trials[3].user_attrs["error"]
    assert trials[4].state.name == "COMPLETE"
    best = yaml.safe_load((tmp_path / "runs" / "crash" / "best.yaml").read_text())
    assert best["model"]["num_attention_heads"] == 4


@needs_optuna
@pytest.mark.slow
def test_a_killed_search_is_continued_and_its_trial_marked_failed(tiny_overrides, tmp_path):
    args = _search("kill", tiny_overrides, "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.n_trials=2")
    long = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, "train.max_steps=100000"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "runs" / "kill" / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.is_file() and time.monotonic() < deadline and long.poll() is None:
        time.sleep(0.2)
    long.send_signal(signal.SIGKILL)  # no chance to tell the study anything
    long.wait()
    assert metrics.is_file()
    time.sleep(2.5)  # past the grace period (2 heartbeats) of trial 0's last heartbeat
    proc = _train(args, tmp_path)
    assert _launched(proc.stdout) == [1]  # the killed trial counts: the study's total is 2
    trials = _trials(tmp_path / "runs" / "kill")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]


@needs_optuna
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=interval(0.1,0.2)", "search keys not in the config: optim.lrr"),
        ("hydra.sweeper.pruner.name=patient", "pruner.name='patient': choose one of"),
        ("hydra.sweeper.sampler.name=cmaes", "sampler.name='cmaes': choose one of"),
        ("hydra.sweeper.storage=sqlite:////no/such/folder/study.db", "cannot open the study storage"),
    ],
)
def test_bad_search_input_is_refused_before_any_trial(tmp_path, override, message):
    proc = _train(["-m", "hparams_search=optuna_lr", "run.name=bad", override], tmp_path, returncode=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing written
