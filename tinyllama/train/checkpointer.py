"""The checkpointer of a training run: when to save, what to save, and how to resume.

As torchtitan's CheckpointManager, it is handed the run's stateful objects once (anything with
`state_dict()` / `load_state_dict()`) and saves, loads and prunes them itself:

    model, optimizer  the weights (model.safetensors) and AdamW state (train_state.pt); under
                 fsdp/tp both go to dcp/, each process writing its shards (torch.distributed.
                 checkpoint), and a resume reads them into its own sharding, whatever the
                 saving run's was: DDP on 2 -> FSDP on 2 -> 1 process continue alike
    states       one entry of train_state.pt each, under its key (schedule, scaler,
                 step and token counters, the best validation loss)
    rank_states  per-rank objects (loader position, RNG states): gathered from every rank into
                 train_state["ranks"], and each rank restores its own on resume; on another
                 number of processes rank r takes saved rank r mod the saved count (the loaders'
                 position is global, the same on every rank)

The file format (folders, pointers, keep-last-K) is tinyllama.checkpoint's; the schedule is a
Cadence shared with the evaluator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from tinyllama.checkpoint import (
    CHECKPOINTS,
    DCP,
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_shards,
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
from tinyllama.train.parallel import Parallelism


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
    # Sharded weights stay on disk (their files checked): Checkpointer.load reads them in place.
    ckpt = load_checkpoint(latest if mode == "auto" else mode, base=job.init_from, consolidate=False)
    diffs = weight_differences(ckpt.model_config, job.model)  # sdpa/eager may change
    diffs += lora_differences(ckpt, job)
    if ckpt.tokenizer_fingerprint != tokenizer.fingerprint:
        diffs.append(
            f"tokenizer fingerprint: checkpoint {ckpt.tokenizer_fingerprint}, config {tokenizer.fingerprint}"
        )
    saved_world = ckpt.train_state["world_size"]
    if saved_world != world_size and job.train.objective != "lm":
        diffs.append(
            f"world size: checkpoint {saved_world}, now {world_size} (each rank resumes its own "
            f"{job.train.objective} data stream; only train.objective=lm resumes on another number of processes)"
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
    to the PEFT files, with `base` naming its base: checkpoint.base_record), sharded in place when
    `parallel` (default: DDP over env's processes) shards it; optimizer: its AdamW; states /
    rank_states: see the module docstring (`states` must hold "step" and "tokens"); evaluator:
    gives each checkpoint its validation loss, and takes it back on resume. Every rank calls
    maybe_save (gathering the per-rank states is collective); rank 0 writes all but the shards
    of a sharded model.
    """

    def __init__(
        self,
        run_dir: Path,
        job: JobConfig,
        env: DistEnv,
        model: nn.Module,
        tokenizer: Tokenizer,
        evaluator: Evaluator,
        optimizer: torch.optim.Optimizer,
        states: Mapping[str, Stateful],
        rank_states: Mapping[str, Stateful],
        base: Optional[dict] = None,
        parallel: Optional[Parallelism] = None,
    ) -> None:
        self.root = run_dir / CHECKPOINTS
        self.job, self.env, self.model, self.tokenizer = job, env, model, tokenizer
        self.optimizer = optimizer
        self.parallel = parallel or Parallelism("ddp", env.world_size)
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
        # One verdict for all ranks (each checks the shards it holds), so that all raise together:
        # a rank-0-only raise would leave the others waiting at the barrier below.
        local = torch.stack([_local(p).isfinite().all() for p in self.model.parameters()]).all()
        if self.env.any(not bool(local)):
            raise NonFiniteLossError(f"weights at step {step} are not finite: not saving them")
        ranks = self.env.all_gather_object({k: s.state_dict() for k, s in self.rank_states.items()})
        if self.parallel.sharded:
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            shards = {"model": model_state, "optimizer": optimizer_state}

            def write_shards(folder: Path) -> None:  # rank 0, inside the temporary folder
                dcp.save(shards, checkpoint_id=str(self.env.broadcast_object(folder)))

            if not self.env.is_main:  # the same collective save, into rank 0's temporary folder
                dcp.save(shards, checkpoint_id=str(self.env.broadcast_object(None)))
        if self.env.is_main:
            train_state = {k: s.state_dict() for k, s in self.states.items()}
            if not self.parallel.sharded:
                train_state["optimizer"] = self.optimizer.state_dict()
            train_state.update(world_size=self.env.world_size, parallel=self.parallel.name, ranks=ranks)
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
                shards=write_shards if self.parallel.sharded else None,
            )
        self.env.barrier()
        return self.root / f"step_{step}"

    def load(self, ckpt: LoadedCheckpoint) -> None:
        """Continue from `ckpt` (see resume_checkpoint): the weights and AdamW state, every state,
        this rank's per-rank states, and the validation loss measured at its step."""
        if ckpt.sharded:  # the pieces this run's sharding needs, from whatever sharding saved them
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            shards = {"model": model_state, "optimizer": optimizer_state}
            read_shards(shards, ckpt.path / DCP, single_process=not self.env.is_distributed)
            set_state_dict(
                self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
            )
        elif ckpt.adapter is not None:  # the base is init_from's, loaded already: the adapters alone
            set_adapter_weights(self.model, ckpt.adapter.tensors)
            self.optimizer.load_state_dict(ckpt.train_state["optimizer"])
        elif self.parallel.sharded:  # whole tensors (a DDP run's) into this run's shards
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ckpt.model_state, options=whole)
            named = optimizer_state_by_name(ckpt.train_state["optimizer"], self.optimizer, self.model)
            set_optimizer_state_dict(self.model, self.optimizer, named, options=whole)
        else:
            self.model.load_state_dict(ckpt.model_state)
            self.optimizer.load_state_dict(ckpt.train_state["optimizer"])
        for key, stateful in self.states.items():
            stateful.load_state_dict(ckpt.train_state[key])
        saved = ckpt.train_state["ranks"]
        mine = saved[self.env.rank % len(saved)]
        for key, stateful in self.rank_states.items():
            stateful.load_state_dict(mine[key])
        if ckpt.val_loss is not None:  # a run resumed at its end is not evaluated twice
            self.evaluator.remember(ckpt.step, ckpt.val_loss)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (its shard of a DTensor, else the tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def optimizer_state_by_name(
    state: Dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> Dict:
    """An optimizer.state_dict() (parameters numbered in the order of the optimizer's groups)
    keyed by parameter names instead, as set_optimizer_state_dict takes it: the numbering is the
    same in every run of a config, since the groups are built from model.named_parameters()."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }
