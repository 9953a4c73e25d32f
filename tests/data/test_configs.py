"""Every shipped data= and tokenizer= preset composes against the schema and validates; the
stage scripts run end to end and turn bad input into one clear error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tinyllama.cli import CONFIG_DIR, to_job
from tinyllama.config import SOURCES

REPO = Path(__file__).resolve().parents[2]
DATA = sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))
TOKENIZERS = sorted(p.stem for p in (Path(CONFIG_DIR) / "tokenizer").glob("*.yaml"))


def compose_job(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_job(compose(config_name="train", overrides=list(overrides)))


# Presets named after their source, but for a local sample of a hub dataset.
PRESET_SOURCE = {"tinystories_sample": "tinystories"}


@pytest.mark.parametrize("name", DATA)
def test_data_presets(name):
    job = compose_job(f"data={name}")
    assert job.data.name == name  # each preset keys its own packed folder
    assert job.data.source == PRESET_SOURCE.get(name, name) and job.data.source in SOURCES


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_presets(name):
    job = compose_job(f"tokenizer={name}", "model.vocab_size=8192")
    assert job.tokenizer.name == name and job.tokenizer.vocab_size in (512, 2048, 4096, 8192)


def test_presets_exist():
    assert {"synthetic", "synthetic_zh", "tinystories", "text_files", "hf"} <= set(DATA)
    assert {"bpe_4k", "bpe_512", "bpe_8k", "unigram_4k", "bpe_8k_zh", "bpe_2k_zh"} <= set(TOKENIZERS)
    assert compose_job().tokenizer.name == "bpe_4k" and compose_job().data.name == "synthetic"


def run_script(script, tmp_path, *overrides):
    env = dict(os.environ, TINYLLAMA_PROGRESS="0")
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / script),
            f"data.root={tmp_path}",
            "hydra.run.dir=" + str(tmp_path / "hydra"),
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prepare_script_end_to_end_and_bad_input(tmp_path):
    ok = run_script(
        "prepare_data.py", tmp_path, "tokenizer=bpe_512", "data.num_docs=100", "data.num_workers=0"
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "tokenizers" / "synthetic-bpe_512" / "tokenizer.model").is_file()
    assert (
        "packed data: " in ok.stdout
        and (Path(ok.stdout.split("packed data: ")[1].strip()) / "meta.json").is_file()
    )
    bad = run_script("train_tokenizer.py", tmp_path, "data=text_files", "data.train_files=[missing/*.txt]")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: 'missing/*.txt' matches no file" in bad.stderr
