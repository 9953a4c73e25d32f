"""Every shipped config composes with Hydra's compose API and validates; typos and wrong types are
reported by name before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tinyllama.cli import CONFIG_DIR, to_job
from tinyllama.errors import ConfigError

CONFIGS = Path(CONFIG_DIR)
PRIMARY = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
# Every option of every group (model, data, tokenizer, logger, experiment, hparams_search, ...).
OPTIONS = sorted((g.name, p.stem) for g in CONFIGS.iterdir() if g.is_dir() for p in g.glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    """One Hydra initialisation for the module (each `initialize` rescans the config tree)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def _compose(config_name: str = "train", overrides=()):
    return compose(config_name=config_name, overrides=list(overrides))


def test_the_shipped_tree_is_found():
    assert "train" in PRIMARY
    groups = {g for g, _ in OPTIONS}
    assert {"model", "data", "tokenizer", "logger"} <= groups
    assert ("model", "tiny") in OPTIONS and ("logger", "wandb") in OPTIONS


@pytest.mark.parametrize("config_name", PRIMARY)
def test_every_primary_config_composes_and_validates(config_name):
    cfg = _compose(config_name)
    job = to_job(cfg)
    # Every composed value reaches the typed job: none dropped, none left at a schema default.
    assert OmegaConf.to_container(OmegaConf.structured(job), resolve=True) == OmegaConf.to_container(
        cfg, resolve=True
    )


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "tokenizer":  # a bigger vocabulary needs a model embedding that covers it
        overrides.append(f"model.vocab_size={_compose('train', overrides).tokenizer.vocab_size}")
    job = to_job(_compose("train", overrides))
    if group == "logger":
        assert job.logger.name == option


def test_the_default_is_the_cpu_demo():
    job = to_job(_compose())
    assert job.model.hidden_size == 128 and job.data.source == "synthetic"
    assert job.train.precision == "auto" and job.logger.name == "none"
    assert job.run.dir == "runs/demo"  # one folder for every rank, no timestamp


def test_grpo_prompt_weights_compose_from_the_command_line_as_the_readme_writes_them():
    job = to_job(_compose("train", ["experiment=grpo_demo", "+grpo.prompt_weights={boy/girl:4,food:0}"]))
    assert dict(job.grpo.prompt_weights) == {"boy/girl": 4.0, "food": 0.0}


@pytest.mark.parametrize(
    "override, name",
    [
        ("train.max_step=5", "max_step"),  # misspelt existing group key
        ("optim.learning_rate=1", "learning_rate"),
        ("model.hiden_size=64", "hiden_size"),
    ],
)
def test_misspelt_keys_are_reported_by_name(override, name):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        to_job(_compose("train", [override]))
    assert name in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize(
    "override, name",
    [
        ("train.max_steps=ten", "max_steps"),
        ("optim.lr=fast", "lr"),
        ("train.compile=maybe", "compile"),
    ],
)
def test_wrong_types_are_reported_by_name(override, name):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        to_job(_compose("train", [override]))
    assert name in str(e.value) + str(e.value.__cause__)


def test_a_typo_inside_a_yaml_file_is_reported_by_name(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("hidden_size: 64\nhiden_layers: 3\n")
    with pytest.raises(ConfigCompositionException) as e:
        _compose("train", [f"hydra.searchpath=[file://{tmp_path}]", "model=mine"])
    assert "hiden_layers" in str(e.value) + str(e.value.__cause__)


def test_bad_values_are_all_reported_at_once():
    cfg = _compose(
        "train",
        [
            "train.seq_len=100000",
            "optim.schedule=linear",
            "train.precision=fp8",
            "checkpoint.keep_last=0",
            "optim.beta2=1.5",
            "train.log_every=0",
        ],
    )
    with pytest.raises(ConfigError) as e:
        to_job(cfg)
    msg = str(e.value)
    for key in (
        "train.seq_len=100000",
        "optim.schedule='linear'",
        "train.precision='fp8'",
        "checkpoint.keep_last=0",
        "optim.beta2=1.5",
        "train.log_every=0",
    ):
        assert key in msg


def test_bad_sampling_settings_are_refused_before_any_checkpoint_is_loaded():
    cfg = _compose(
        "sample",
        [
            "sample.temperature=-1",
            "sample.top_k=0",
            "sample.top_p=1.5",
            "sample.repetition_penalty=0",
            "sample.weights=int4",
        ],
    )
    with pytest.raises(ConfigError) as e:
        to_job(cfg)
    for key in (
        "sample.temperature=-1",
        "sample.top_k=0",
        "sample.top_p=1.5",
        "sample.repetition_penalty=0",
        "sample.weights='int4': choose float32 or int8",
    ):
        assert key in str(e.value)


def test_keys_added_with_plus_are_refused_not_dropped():
    # `+key=value` passes Hydra's struct check; OmegaConf.to_object would silently drop it.
    with pytest.raises(ConfigError, match=r"train\.max_step\b.*\bfoo\b"):
        to_job(_compose(overrides=["+train.max_step=5", "+foo=1"]))


def test_rope_scaling_can_be_set_from_the_command_line():
    job = to_job(_compose(overrides=["model.rope_scaling={rope_type:linear,factor:2.0}"]))
    assert job.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_scaling=5: must be a mapping"):
        to_job(_compose(overrides=["model.rope_scaling=5"]))


def test_bad_serve_settings_are_reported_at_once():
    cfg = _compose(
        "serve",
        ["serve.port=70000", "serve.max_batch=0", "serve.stream_interval=-0.1", "serve.threads=0"],
    )
    with pytest.raises(ConfigError) as e:
        to_job(cfg)
    for key in ("serve.port=70000", "serve.max_batch=0", "serve.stream_interval=-0.1", "serve.threads=0"):
        assert key in str(e.value)
