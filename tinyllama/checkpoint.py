"""Checkpoints: atomic save, keep-last-K + best, and the one loader every stage uses.

A checkpoint folder describes itself:

    runs/<name>/checkpoints/step_<N>/
        model.safetensors    weights of the unwrapped model, Hugging Face key names
                             (a tied lm_head is stored once, as model.embed_tokens.weight)
        model_config.json    the LlamaConfig
        config.yaml          the resolved JobConfig of the run
        tokenizer.model      a copy of the SentencePiece model
        train_state.pt       optimizer, scaler, schedule, step, tokens, loader and RNG states per rank
        meta.json            step, tokens, validation loss, tokenizer fingerprint (written last)
    runs/<name>/checkpoints/latest   text file naming the newest complete folder (written last)
    runs/<name>/checkpoints/best     text file naming the folder with the lowest validation loss

A save writes into a hidden temporary folder and renames it into place, then replaces the
`latest` pointer, so a save killed at any moment leaves `latest` naming a complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tinyllama.config import CheckpointConfig, JobConfig, run_dir_of, split_unknown
from tinyllama.device import pick_device
from tinyllama.errors import CheckpointError
from tinyllama.model.config import LlamaConfig
from tinyllama.model.heads import drop_tied_head, restore_tied_head
from tinyllama.tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
LATEST, BEST = "latest", "best"
WEIGHTS, MODEL_CONFIG, RUN_CONFIG = "model.safetensors", "model_config.json", "config.yaml"
TOKENIZER, TRAIN_STATE, META = "tokenizer.model", "train_state.pt", "meta.json"
REQUIRED = (WEIGHTS, MODEL_CONFIG, RUN_CONFIG, TOKENIZER, META)


@dataclass
class LoadedCheckpoint:
    """Everything one checkpoint folder holds, read by `load_checkpoint`.

    model_state has every key of LlamaForCausalLM.state_dict() (a tied lm_head.weight is the
    embedding tensor again); train_state is None when loaded with train_state=False.
    """

    path: Path
    step: int
    tokens: int
    val_loss: Optional[float]
    model_config: LlamaConfig
    job: JobConfig
    model_state: Dict[str, torch.Tensor]
    tokenizer_path: Path
    tokenizer_fingerprint: Optional[str]
    train_state: Optional[Dict[str, Any]]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its checkpoints/ folder, a `latest`/`best` pointer file, or a step_N folder
    -> the step_N folder it names."""
    p = Path(path)
    if (p / CHECKPOINTS).is_dir():
        p = p / CHECKPOINTS
    if p.is_dir() and (p / LATEST).is_file():
        p = p / LATEST
    if p.is_file() and p.name in (LATEST, BEST):
        p = p.parent / p.read_text().strip()
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: give a run folder (runs/<name>), its "
                              "checkpoints/latest, or a checkpoints/step_<N> folder")
    return p


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt ({e})") from e


def _known_keys(data: Dict[str, Any], schema: type, folder: Path) -> Dict[str, Any]:
    """Drop (with a warning) config keys this version no longer has, so older checkpoints load."""
    known, unknown = split_unknown(data, schema)
    if unknown:
        warnings.warn(f"checkpoint {folder}: ignoring config keys this version does not know: "
                      f"{', '.join(unknown)}")
    return known


def load_checkpoint(path: str | Path, train_state: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint (see `resolve_checkpoint` for what `path` may be).

    train_state=False skips the optimizer/loader/RNG file (evaluation, sampling, export).
    Raises CheckpointError naming the file when anything is missing, truncated or corrupt.
    """
    folder = resolve_checkpoint(path)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); "
                              "use an older checkpoints/step_<N> folder")
    meta = _read_json(folder / META)
    model_config = LlamaConfig(**_known_keys(_read_json(folder / MODEL_CONFIG), LlamaConfig, folder))
    try:
        run_config = _known_keys(OmegaConf.to_container(OmegaConf.load(folder / RUN_CONFIG)),
                                 JobConfig, folder)
        job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), run_config))
        state = load_file(folder / WEIGHTS)
    except Exception as e:  # truncated safetensors, bad YAML, wrong field types
        raise CheckpointError(f"checkpoint {folder} is corrupt: {type(e).__name__}: {e}") from e
    state = restore_tied_head(state, model_config)
    trainer_state = None
    if train_state:
        if not (folder / TRAIN_STATE).is_file():
            raise CheckpointError(f"checkpoint {folder} has no {TRAIN_STATE}: it holds weights only "
                                  "and cannot be resumed (use init_from= to start from its weights)")
        try:
            trainer_state = torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{folder / TRAIN_STATE} is corrupt: {type(e).__name__}: {e}") from e
    return LoadedCheckpoint(
        path=folder, step=int(meta["step"]), tokens=int(meta.get("tokens", 0)),
        val_loss=meta.get("val_loss"), model_config=model_config, job=job, model_state=state,
        tokenizer_path=folder / TOKENIZER, tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
        train_state=trainer_state,
    )


def build_model(ckpt: LoadedCheckpoint, device: torch.device | str = "cpu") -> torch.nn.Module:
    """LlamaForCausalLM with the checkpoint's config and weights, in eval mode on `device`."""
    from tinyllama.model import LlamaForCausalLM

    model = LlamaForCausalLM(ckpt.model_config)
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {ckpt.path} do not fit its model config: {e}") from e
    return model.to(device).eval()


def config_differences(saved: LlamaConfig, current: LlamaConfig) -> List[str]:
    """'field: checkpoint X, config Y' for every LlamaConfig field that differs."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(current)
    return [f"model.{k}: checkpoint {a[k]!r}, config {b[k]!r}" for k in a if a[k] != b.get(k)]


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name and a rename, so that readers (and a
    process killed mid-write) see the old file or the new one, never a partial one."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on POSIX


def _write_pointer(folder: Path, name: str, target: str) -> None:
    write_text_atomic(folder / name, target + "\n")


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, model_config: LlamaConfig,
                    job: JobConfig, tokenizer_path: Path, meta: Dict[str, Any],
                    train_state: Optional[Dict[str, Any]]) -> Path:
    """Write checkpoints/step_<step>/ atomically under `root` (a run's checkpoints/ folder) and
    point `latest` at it. `model` must be the unwrapped module (no DDP/compile wrapper)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale)  # left by a save that was killed (only rank 0 ever saves)
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    tmp.mkdir()
    state = {k: v.detach().to("cpu").contiguous()
             for k, v in drop_tied_head(model.state_dict(), model_config).items()}
    save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(model_config), indent=2))
    (tmp / RUN_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(job)))
    shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_pointer(root, LATEST, final.name)
    return final


class Checkpointer:
    """Owns the checkpoint schedule of a run: every `cfg.every` steps and at the end, keeping the
    last `cfg.keep_last` and the best by validation loss. Only rank 0 writes; every rank calls
    `maybe_save`, because gathering the per-rank training state is collective.

    save_fn(root, step) -> Path writes one checkpoint; it is called on every rank (the loop's
    `Trainer.save`, which gathers per-rank states and lets rank 0 alone write).
    """

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, is_main: bool, max_steps: int,
                 save_fn: Callable[[Path, int], Path]) -> None:
        self.root = run_dir / CHECKPOINTS
        self.cfg = cfg
        self.is_main = is_main
        self.max_steps = max_steps
        self._save_fn = save_fn
        self.last_saved: Optional[int] = None

    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        return resolve_checkpoint(pointer) if pointer.is_file() else None

    def maybe_save(self, step: int, force: bool = False) -> Optional[Path]:
        """Save at multiples of cfg.every, at max_steps, or when forced (a stop signal)."""
        due = step % self.cfg.every == 0 or step == self.max_steps or force
        if not due or step == self.last_saved:
            return None
        path = self._save_fn(self.root, step)
        self.last_saved = step
        if self.is_main:
            self._prune()
        return path

    def _prune(self) -> None:
        """Delete all but the newest keep_last folders and the best one; update `best`."""
        folders = sorted((p for p in self.root.glob("step_*") if (p / META).is_file()),
                         key=lambda p: int(p.name.split("_")[1]))
        losses = {p: _read_json(p / META).get("val_loss") for p in folders}
        scored = [p for p in folders if losses[p] is not None]
        keep = set(folders[-self.cfg.keep_last:])
        if scored:
            best = min(scored, key=lambda p: losses[p])
            keep.add(best)
            _write_pointer(self.root, BEST, best.name)
        for p in folders:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


def load_for_inference(job: JobConfig, rope_type: Optional[str] = None, rope_factor: float = 1.0):
    """What the evaluate, sample and export stages start from: the checkpoint named by
    job.checkpoint_path (default run.dir) without its training state, its model in eval mode on
    run.device, and its tokenizer. rope_type/rope_factor replace the trained RoPE scaling (e.g.
    a model trained at 256 tokens evaluated at 1024). Returns (ckpt, model, tokenizer, device)."""
    ckpt = load_checkpoint(job.checkpoint_path or run_dir_of(job), train_state=False)
    if rope_type is not None:
        rope = {"rope_type": rope_type, "factor": float(rope_factor)}
        if rope_type == "llama3":
            rope.update(low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=ckpt.model_config.max_position_embeddings)
        ckpt.model_config = dataclasses.replace(ckpt.model_config, rope_scaling=rope)
    device = pick_device(job.run.device)
    return ckpt, build_model(ckpt, device), Tokenizer.load(ckpt.tokenizer_path), device
