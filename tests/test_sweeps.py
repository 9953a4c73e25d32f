"""Recipes and sweeps: every shipped recipe and search composes and validates, a grid sweep
and an Optuna search run end to end through `python train.py -m`, one run folder per job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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
    searched = cfg.hydra.sweeper.params
    assert {"optim.lr", "optim.warmup_steps", "optim.weight_decay"} <= set(searched)
    for key in searched:  # a misspelt key would only fail at the first trial
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    to_job(_compose([f"hparams_search={search}", "experiment=cpu_quick"]))


def _tiny_overrides(tiny_data) -> list:
    """Command-line overrides that reproduce the tiny_data fixture (so its tokenizer and
    packed shards are reused) and a seconds-long model and schedule."""
    data, tok = tiny_data
    return [
        f"data.root={data.root}", f"data.num_docs={data.num_docs}", f"data.seed={data.seed}",
        "data.num_workers=0", f"tokenizer.name={tok.name}", f"tokenizer.vocab_size={tok.vocab_size}",
        "tokenizer.num_threads=1", f"model.vocab_size={tok.vocab_size}", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_hidden_layers=1", "model.max_position_embeddings=32",
        "train.max_steps=2", "train.batch_size=2", "train.seq_len=16", "train.log_every=1",
        "eval.every=2", "eval.batches=1", "checkpoint.every=2", "sample.num_samples=1",
        "sample.max_new_tokens=2", "run.device=cpu",
    ]


def _train(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("TINYLLAMA_JOB_DIR", None)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _final_val_loss(run: Path) -> float:
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in line]
    return evals[-1]["val_loss"]


def test_grid_sweep_gives_each_job_its_own_run_folder(tiny_data, tmp_path):
    _train(["-m", "optim.lr=1e-3,3e-3", "run.name=grid", *_tiny_overrides(tiny_data)], tmp_path)
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


def test_optuna_search_minimises_the_returned_val_loss(tiny_data, tmp_path):
    _train(["hparams_search=optuna_lr", "hydra.sweeper.n_trials=2", "run.name=search",
            *_tiny_overrides(tiny_data)], tmp_path)
    sweep = tmp_path / "runs" / "search"
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name != ".hydra")
    assert [p.name for p in trials] == ["0", "1"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # Optuna saw what train_main returned: the best trial's final validation loss.
    assert result["best_value"] == pytest.approx(min(_final_val_loss(t) for t in trials))
    assert set(result["best_params"]) == {"optim.lr", "optim.warmup_steps", "optim.weight_decay"}
