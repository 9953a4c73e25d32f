"""The checkpointer of a training run: when to save, what to save, and how to resume.

As torchtitan's CheckpointManager, it is handed the run's stateful objects once (anything with
`state_dict()` / `load_state_dict()`) and saves, loads and prunes them itself:

    states       one entry of train_state.pt each, under its key (optimizer, schedule, scaler,
                 step and token counters, the best validation loss)
    rank_states  per-rank objects (loader position, RNG states): gathered from every rank into
                 train_state["ranks"], and each rank restores its own on resume

The file format (folders, pointers, keep-last-K) is tinyllama.checkpoint's; the schedule is a
Cadence shared with the evaluator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

import torch
from torch import nn

from tinyllama.checkpoint import (
    CHECKPOINTS,
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from tinyllama.config import JobConfig
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.lora import set_adapter_weights
from tinyllama.tokenizer import Tokenizer
from tinyllama.train.build import weight_differences
from tinyllama.train.cadence import Cadence
from tinyllama.train.distributed import DistEnv
from tinyllama.train.evaluator import Evaluator
from tinyllama.train.nan_guard import NonFiniteLossError


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Attribute:
    """One attribute of an object as a stateful entry (a counter such as the step, the best
    validation loss): its value is saved as it is and set back on load."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def state_dict(self) -> Any:
        return getattr(self.obj, self.name)

    def load_state_dict(self, state: Any) -> None:
        setattr(self.obj, self.name, state)


def resume_checkpoint(
    run_dir: Path, job: JobConfig, tokenizer: Tokenizer, world_size: int
) -> Optional[LoadedCheckpoint]:
    """The checkpoint that checkpoint.resume asks to continue from (None: a fresh run), after
    checking that it fits this run; refusals happen here, before anything is written."""
    mode, latest = job.checkpoint.resume, latest_checkpoint(run_dir / CHECKPOINTS)
    if mode == "never":
        if latest is not None:
            raise ConfigError(
                f"{run_dir} already holds checkpoints ({latest.name}): "
                "continue it with checkpoint.resume=auto, or pick another "
                "run.name (nothing was overwritten)"
            )
        return None
    if mode == "auto" and latest is None:
        return None  # a fresh run
    # A LoRA checkpoint is checked against the base this run starts from (its init_from).
    ckpt = load_checkpoint(latest if mode == "auto" else mode, base=job.init_from)
    diffs = weight_differences(ckpt.model_config, job.model)  # sdpa/eager may change
    diffs += lora_differences(ckpt, job)
    if ckpt.tokenizer_fingerprint != tokenizer.fingerprint:
        diffs.append(
            f"tokenizer fingerprint: checkpoint {ckpt.tokenizer_fingerprint}, config {tokenizer.fingerprint}"
        )
    saved_world = ckpt.train_state["world_size"]
    if saved_world != world_size:
        diffs.append(
            f"world size: checkpoint {saved_world}, now {world_size} (each rank resumes its own data stream)"
        )
    if diffs:
        raise CheckpointError(
            f"cannot resume from {ckpt.path}:\n  "
            + "\n  ".join(diffs)
            + "\nuse the run's original settings, or start a new run.name "
            f"with init_from={ckpt.path} to reuse the weights only"
        )
    return ckpt


def lora_differences(ckpt: LoadedCheckpoint, job: JobConfig) -> list:
    """'finetune.lora.<key>: checkpoint X, config Y' where the checkpoint's adapter (or its
    absence) differs from what job.finetune.lora asks for."""
    lora = job.finetune.lora
    saved = ckpt.job.finetune.lora
    if ckpt.adapter is None and lora.rank is None:
        return []
    keys = ("rank", "alpha", "dropout", "target_modules", "modules_to_save")
    if ckpt.adapter is None or lora.rank is None:
        keys = ("rank",)
    return [
        f"finetune.lora.{k}: checkpoint {getattr(saved, k)!r}, config {getattr(lora, k)!r}"
        for k in keys
        if getattr(saved, k) != getattr(lora, k)
    ]


class Checkpointer:
    """Saves the run every `checkpoint.every` steps, at the end and when forced (a stop signal),
    keeping the last `checkpoint.keep_last` and the best by validation loss.

    model: the unwrapped module (its weights go to model.safetensors; a LoRA model's adapters go
    to the PEFT files, with `base` naming its base: checkpoint.base_record); states / rank_states: see
    the module docstring (`states` must hold "step" and "tokens"); evaluator: gives each
    checkpoint its validation loss, and takes it back on resume. Every rank calls maybe_save
    (gathering the per-rank states is collective); only rank 0 writes.
    """

    def __init__(
        self,
        run_dir: Path,
        job: JobConfig,
        env: DistEnv,
        model: nn.Module,
        tokenizer: Tokenizer,
        evaluator: Evaluator,
        states: Mapping[str, Stateful],
        rank_states: Mapping[str, Stateful],
        base: Optional[dict] = None,
    ) -> None:
        self.root = run_dir / CHECKPOINTS
        self.job, self.env, self.model, self.tokenizer = job, env, model, tokenizer
        self.evaluator, self.states, self.rank_states = evaluator, states, rank_states
        self.base = base
        self.cadence = Cadence(job.checkpoint.every, job.train.max_steps)

    def maybe_save(self, step: int, force: bool = False) -> Optional[Path]:
        """Save at multiples of checkpoint.every, at max_steps, or when forced; once per step."""
        if not self.cadence.due(step, force):
            return None
        path = self.save(step)
        self.cadence.mark(step)
        if self.env.is_main:
            prune_checkpoints(self.root, self.job.checkpoint.keep_last)
        return path

    def save(self, step: int) -> Path:
        """Write checkpoints/step_<step>/ of the current state (collective: every rank calls it)."""
        # Every rank holds the same weights, so every rank reaches the same verdict and raises
        # together (a rank-0-only raise would leave the others waiting at the barrier below).
        finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise NonFiniteLossError(f"weights at step {step} are not finite: not saving them")
        ranks = self.env.all_gather_object({k: s.state_dict() for k, s in self.rank_states.items()})
        if self.env.is_main:
            train_state = {k: s.state_dict() for k, s in self.states.items()}
            train_state.update(world_size=self.env.world_size, ranks=ranks)
            meta = {
                "tokens": train_state["tokens"],
                "val_loss": self.evaluator.loss_at(step),
                "tokenizer_fingerprint": self.tokenizer.fingerprint,
            }
            save_checkpoint(
                self.root,
                step,
                self.model,
                self.job.model,
                self.job,
                self.tokenizer.model_path,
                meta,
                train_state,
                base=self.base,
            )
        self.env.barrier()
        return self.root / f"step_{step}"

    def load(self, ckpt: LoadedCheckpoint) -> None:
        """Continue from `ckpt` (see resume_checkpoint): the weights, every state, this rank's
        per-rank states, and the validation loss measured at its step."""
        if ckpt.adapter is not None:  # the base is init_from's, loaded already: the adapters alone
            set_adapter_weights(self.model, ckpt.adapter.tensors)
        else:
            self.model.load_state_dict(ckpt.model_state)
        for key, stateful in self.states.items():
            stateful.load_state_dict(ckpt.train_state[key])
        mine = ckpt.train_state["ranks"][self.env.rank]
        for key, stateful in self.rank_states.items():
            stateful.load_state_dict(mine[key])
        if ckpt.val_loss is not None:  # a run resumed at its end is not evaluated twice
            self.evaluator.remember(ckpt.step, ckpt.val_loss)
