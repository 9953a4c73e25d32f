"""Command-line entry points: the only module that imports Hydra.

Each stage composes its YAML (configs/<stage>.yaml, all rooted in the typed `JobConfig`; the
evaluate, sample, chat, export and inspect stages share configs/stage.yaml), turns it into
dataclasses, validates it, and calls the library. Errors a user can cause (`TinyLlamaError`)
are printed as one message, without a traceback, and exit with status 2.

Each `*_main` imports its stage's module (tinyllama.evaluate, .sample, .chat, .export, .export_gguf,
.inspect, .train.loop, ...) inside the function, on purpose: this module is the entry point of
every stage, so `--help` and each stage start without importing the others' modules (a sample
run never loads the training loop, the exports or the course tooling).

    python train.py model=tiny data=tinystories        # or: tinyllama-train ...
    tinyllama-tokenizer data=text_files data.train_files=[my.txt]
    tinyllama-prepare data=tinystories
    python scripts/evaluate.py run.dir=runs/demo
    python scripts/sample.py run.dir=runs/demo sample.prompt="Once upon a time"
    python scripts/chat.py run.dir=runs/chat_demo prompt="Who is the story about?"
    python scripts/serve.py run.dir=runs/chat_demo serve.port=8000
    python scripts/export_hf.py run.dir=runs/demo
    python scripts/export_gguf.py run.dir=runs/demo export.dtype=q8_0
    python scripts/inspect_model.py model=llama2_7b
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tinyllama.config import JobConfig, split_unknown, validate
from tinyllama.errors import ConfigError, TinyLlamaError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

# The schema every YAML is checked against: unknown keys and wrong types fail by name.
ConfigStore.instance().store(name="job_schema", node=JobConfig)


def to_job(cfg: DictConfig) -> JobConfig:
    """DictConfig (composed by Hydra or by the compose API in tests) -> validated JobConfig."""
    _, unknown = split_unknown(OmegaConf.to_container(cfg, resolve=False))
    if unknown:  # `+key=value` gets past Hydra's struct check, and to_object would drop it
        raise ConfigError(
            f"unknown config keys: {', '.join(unknown)}; see tinyllama/config.py "
            "for the keys each group takes (a misspelling?)"
        )
    job = OmegaConf.to_object(cfg)
    validate(job)
    return job


def compose_job(overrides: list[str] | None = None, config_name: str = "train") -> JobConfig:
    """The validated JobConfig that `python train.py <overrides>` would run, composed without
    starting a Hydra app (for the course trainer, notebooks and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_job(compose(config_name=config_name, overrides=list(overrides or [])))


def job_config_args(job: JobConfig, folder: Path) -> list[str]:
    """`train.py` arguments that run exactly `job`: its resolved config written to
    folder/job.yaml as the primary config (schema-checked like configs/train.yaml), for launching
    a JobConfig in other processes (torchrun)."""
    body = OmegaConf.to_yaml(OmegaConf.structured(job))
    (Path(folder) / "job.yaml").write_text(
        "defaults:\n  - job_schema\n  - _self_\n"
        + body
        + f"hydra:\n  run:\n    dir: {job.run.dir}\n  output_subdir: null\n"
    )
    return ["--config-dir", str(folder), "--config-name", "job"]


def _stage(config_name: str) -> Callable[[Callable[[JobConfig], Any]], Callable[[], Any]]:
    """Wrap `fn(job)` as a Hydra app reading configs/<config_name>.yaml."""

    def wrap(fn: Callable[[JobConfig], Any]) -> Callable[[], Any]:
        @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")
        @functools.wraps(fn)
        def main(cfg: DictConfig) -> Any:
            try:
                return fn(to_job(cfg))
            except TinyLlamaError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)

        return main

    return wrap


@_stage("train")
def train_main(job: JobConfig) -> float:
    """Whole pipeline: tokenizer and packed data if missing, then train, evaluate, sample.
    Returns the final validation loss, so Hydra sweepers can minimise it."""
    from tinyllama.train.loop import run_training

    return run_training(job, overrides=list(HydraConfig.get().overrides.task), on_eval=_search_trial_hook())


def _search_trial_hook() -> Callable[[int, float], bool] | None:
    """In a trial of a study search (configs/hydra/sweeper/study.yaml), the hook that reports
    its validation losses to Optuna and prunes it; None in any other run."""
    from hydra.types import RunMode

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if (
        hc is None
        or hc.mode != RunMode.MULTIRUN
        or not str(hc.sweeper.get("_target_", "")).endswith(".StudySweeper")
    ):
        return None
    from tinyllama.search.trial import eval_reporter

    sweeper = OmegaConf.to_container(hc.sweeper, resolve=True)
    return eval_reporter(sweeper, Path(hc.runtime.cwd) / hc.sweep.dir, hc.job.num)


@_stage("train")
def tokenizer_main(job: JobConfig) -> None:
    """Train (or reuse) the SentencePiece tokenizer for `data` and `tokenizer`."""
    from tinyllama.tokenizer import ensure_tokenizer

    tok = ensure_tokenizer(job.tokenizer, job.data)
    print(f"tokenizer: {tok.model_path} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint})")


@_stage("train")
def prepare_main(job: JobConfig) -> None:
    """Pack `data` into token shards with the tokenizer (training it first if missing)."""
    from tinyllama.data import ensure_packed
    from tinyllama.tokenizer import ensure_tokenizer

    tok = ensure_tokenizer(job.tokenizer, job.data)
    print(f"packed data: {ensure_packed(job.data, tok)}")


@_stage("inspect")
def inspect_main(job: JobConfig) -> None:
    """Course tooling for `model`: module tree, parameter/FLOP counts, memory, shape trace.
    Builds the model on the meta device, so any preset (7B included) prints in seconds."""
    from tinyllama.inspection import inspect_report

    print(inspect_report(job.model, job.inspect, job.run.seed))


@_stage("evaluate")
def evaluate_main(job: JobConfig) -> dict:
    """Loss, perplexity, bits per byte and loss by position of a checkpoint (checkpoint_path or
    run.dir) on its validation split or any text (evaluate.source=data); JSON into <run>/eval/."""
    from tinyllama.evaluate import run_evaluation

    return run_evaluation(job)


@_stage("sample")
def sample_main(job: JobConfig) -> None:
    """Stream continuations of `prompt` (or sample.prompt_file, or stdin with sample.interactive)."""
    from tinyllama.sample import run_sampling

    run_sampling(job)


@_stage("chat")
def chat_main(job: JobConfig) -> None:
    """Reply to `prompt` once, or chat on stdin (without `prompt`): a fine-tuned chat run."""
    from tinyllama.chat import run_chat

    run_chat(job)


@_stage("serve")
def serve_main(job: JobConfig) -> None:
    """Serve a checkpoint (checkpoint_path or run.dir) over OpenAI's API, with a chat page at /."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"serving needs {' and '.join(missing)}: pip install -e '.[serve]' (or make install)"
        )
    from tinyllama.serve.server import run_serve

    run_serve(job)


@_stage("export")
def export_main(job: JobConfig) -> None:
    """Write a checkpoint as a Hugging Face folder (export.out_dir, default <run>/hf) and verify it."""
    from tinyllama.export import run_export

    run_export(job)


@_stage("export")
def export_gguf_main(job: JobConfig) -> None:
    """Write a checkpoint as a GGUF file + Ollama Modelfile (export.out_dir, default <run>/gguf)
    for llama.cpp / Ollama, and verify it with llama-cpp-python where installed."""
    from tinyllama.export_gguf import run_export_gguf

    run_export_gguf(job)
