"""Checkpoints on disk: atomic save, keep-last-K + best, and the one loader every stage uses.

This module is the format; `tinyllama.train.checkpointer` decides when a training run saves and
what goes into train_state.pt (it is handed the run's stateful objects).

A checkpoint folder describes itself:

    runs/<name>/checkpoints/step_<N>/
        model.safetensors    weights of the unwrapped model, Hugging Face key names
                             (a tied lm_head is stored once, as model.embed_tokens.weight)
        model_config.json    the LlamaConfig
        config.yaml          the resolved JobConfig of the run
        tokenizer.model      a copy of the SentencePiece model
        train_state.pt       optimizer, scaler, schedule, step, tokens, loader and RNG states per rank
        meta.json            step, tokens, validation loss, tokenizer fingerprint (written last)

A LoRA run's folder holds the adapter instead of model.safetensors, so that the folder is itself
a PEFT adapter folder (`PeftModel.from_pretrained(<the base's HF export>, step_<N>)`):

        adapter_config.json        PEFT's LoraConfig (r, lora_alpha, target_modules, ...)
        adapter_model.safetensors  lora_A / lora_B of each wrapped layer, PEFT's key names
        base.json                  the base: init_from as given, its resolved folder, and the
                                   fingerprint of its weights

A run trained with train.parallel=fsdp or train.tp holds its weights and AdamW state sharded
instead of model.safetensors, as torch.distributed.checkpoint (DCP) writes them, each process
its own part:

        dcp/.metadata        which piece of which tensor lies where (DCP's index)
        dcp/__<rank>_0.distcp  the pieces rank <rank> held: weights under "model.", AdamW
                             moments under "optimizer."

`load_checkpoint` consolidates the weights into whole tensors on load (a single process, no
process group), so every stage reads such a folder like any other; a resume reads the pieces
it needs into whatever sharding the new run has (tinyllama.train.checkpointer).

`load_checkpoint` reads the base again, refuses one whose fingerprint differs (naming both), and
gives the merged weights as model_state, so every stage loads a LoRA run as a plain model;
`adapter` keeps the parts (a resume loads the adapter into the training model, an export may
write base and adapter apart).
    runs/<name>/checkpoints/latest   text file naming the newest complete folder (written last)
    runs/<name>/checkpoints/best     text file naming the folder with the lowest validation loss

A save builds the folder under a temporary name and renames it into place (tinyllama.atomic),
then replaces the `latest` pointer, so a save killed at any moment leaves `latest` naming a
complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tinyllama.atomic import building_folder, write_text_atomic
from tinyllama.config import JobConfig, run_dir_of, split_unknown
from tinyllama.device import pick_device
from tinyllama.errors import CheckpointError
from tinyllama.hf_import import import_hf
from tinyllama.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    lora_modules,
    lora_state_dict,
    merged_state,
    model_peft_config,
    read_peft_adapter,
    write_peft_files,
)
from tinyllama.model import LlamaForCausalLM
from tinyllama.model.config import LlamaConfig
from tinyllama.model.heads import drop_tied_head, restore_tied_head
from tinyllama.tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
LATEST, BEST = "latest", "best"
WEIGHTS, MODEL_CONFIG, RUN_CONFIG = "model.safetensors", "model_config.json", "config.yaml"
TOKENIZER, TRAIN_STATE, META = "tokenizer.model", "train_state.pt", "meta.json"
BASE = "base.json"
DCP = "dcp"
REQUIRED = (MODEL_CONFIG, RUN_CONFIG, TOKENIZER, META)  # and WEIGHTS, DCP, or the ADAPTER files
ADAPTER = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE)


@dataclass
class AdapterState:
    """The parts of a LoRA checkpoint (LoadedCheckpoint.adapter).

    config: its adapter_config.json; names: the wrapped module names; tensors: lora_A / lora_B
    under PEFT's keys; base: base.json (init_from, path, fingerprint); base_source: where the base
    weights were read this time; base_state: those weights (every key of the model, unmerged).
    """

    config: Dict[str, Any]
    names: List[str]
    tensors: Dict[str, torch.Tensor]
    base: Dict[str, str]
    base_source: str
    base_state: Dict[str, torch.Tensor]


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
    adapter: Optional[AdapterState] = None
    sharded: bool = False  # weights and AdamW state in dcp/ (model_state: None unless consolidated)


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
        raise CheckpointError(
            f"no checkpoint at {path}: give a run folder (runs/<name>), its "
            "checkpoints/latest, or a checkpoints/step_<N> folder"
        )
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
        warnings.warn(
            f"checkpoint {folder}: ignoring config keys this version does not know: {', '.join(unknown)}",
            stacklevel=2,
        )
    return known


def check_shards(folder: Path):
    """The DCP index of `folder` (a step's dcp/ folder) after checking that every file it names
    is there and holds every byte it is said to: a missing or truncated shard is a
    CheckpointError naming the file, before any of it is read."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"sharded checkpoint {folder} has no .metadata: it is incomplete")
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{folder / '.metadata'} is corrupt: {type(e).__name__}: {e}") from e
    needed: Dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(
                f"sharded checkpoint {folder} is missing {name}: use an older checkpoints/step_<N> folder"
            )
        if shard.stat().st_size < size:
            raise CheckpointError(
                f"shard {shard} is truncated ({shard.stat().st_size} of {size} bytes): "
                "use an older checkpoints/step_<N> folder"
            )
    return metadata


def read_shards(state: Dict[str, Any], folder: Path, single_process: bool = True) -> None:
    """Fill `state` ({"model": ..., "optimizer": ...} of tensors or DTensors, any sharding) in
    place from the DCP folder `folder`: each process reads the pieces its tensors cover.
    single_process: this process alone (no collective), else every rank calls it."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # DCP warns that no process group means one process: meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder), no_dist=single_process)
    except Exception as e:
        raise CheckpointError(f"sharded checkpoint {folder} is corrupt: {type(e).__name__}: {e}") from e


def load_sharded_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """The whole weights of a DCP folder (every "model." tensor, consolidated from its shards)
    in this process alone, Hugging Face key names."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = check_shards(folder)
    prefix = "model."
    state = {
        key[len(prefix) :]: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    read_shards({"model": state}, folder)
    return state


def load_checkpoint(
    path: str | Path, train_state: bool = True, base: Optional[str] = None, consolidate: bool = True
) -> LoadedCheckpoint:
    """Load a checkpoint (see `resolve_checkpoint` for what `path` may be).

    train_state=False skips the optimizer/loader/RNG file (evaluation, sampling, export).
    consolidate=False leaves a sharded checkpoint's weights in dcp/ (model_state None; its
    shards are still checked): a resume reads them into its own sharding.
    base: for a LoRA checkpoint, where to read its base (a run or checkpoint folder, or
    hf:<folder>) instead of the folder base.json names; its weights must be the same.
    Raises CheckpointError naming the file when anything is missing, truncated or corrupt.
    """
    folder = resolve_checkpoint(path)
    adapter = (folder / BASE).is_file()
    sharded = (folder / DCP).is_dir() and not (folder / WEIGHTS).is_file()
    weights = ADAPTER if adapter else () if sharded else (WEIGHTS,)
    missing = [name for name in REQUIRED + weights if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); "
            "use an older checkpoints/step_<N> folder"
        )
    meta = _read_json(folder / META)
    model_config = LlamaConfig(**_known_keys(_read_json(folder / MODEL_CONFIG), LlamaConfig, folder))
    try:
        run_config = _known_keys(
            OmegaConf.to_container(OmegaConf.load(folder / RUN_CONFIG)), JobConfig, folder
        )
        job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), run_config))
        state = None if adapter or sharded else load_file(folder / WEIGHTS)
    except Exception as e:  # truncated safetensors, bad YAML, wrong field types
        raise CheckpointError(f"checkpoint {folder} is corrupt: {type(e).__name__}: {e}") from e
    parts = None
    if sharded:
        if consolidate:
            state = restore_tied_head(load_sharded_weights(folder / DCP), model_config)
        else:
            check_shards(folder / DCP)
    elif adapter:
        parts = _load_adapter(folder, model_config, base)
        state = merged_state(parts.base_state, parts.config, parts.names, parts.tensors)
    else:
        state = restore_tied_head(state, model_config)
    trainer_state = None
    if train_state:
        if not (folder / TRAIN_STATE).is_file():
            raise CheckpointError(
                f"checkpoint {folder} has no {TRAIN_STATE}: it holds weights only "
                "and cannot be resumed (use init_from= to start from its weights)"
            )
        try:
            trainer_state = torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{folder / TRAIN_STATE} is corrupt: {type(e).__name__}: {e}") from e
    return LoadedCheckpoint(
        path=folder,
        step=int(meta["step"]),
        tokens=int(meta.get("tokens", 0)),
        val_loss=meta.get("val_loss"),
        model_config=model_config,
        job=job,
        model_state=state,
        tokenizer_path=folder / TOKENIZER,
        tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
        train_state=trainer_state,
        adapter=parts,
        sharded=sharded,
    )


def weights_fingerprint(state: Dict[str, torch.Tensor]) -> str:
    """ "sha256:<16 hex digits>" over every tensor's name, dtype, shape and bytes: what names the
    exact weights a LoRA adapter was trained on."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()[:16]


def load_weights(source: str) -> Tuple[LlamaConfig, Dict[str, torch.Tensor]]:
    """(config, state_dict) of a run or checkpoint folder (a LoRA one merged), or of
    "hf:<local Hugging Face folder>": the weights init_from= and a LoRA base name."""
    if source.startswith("hf:"):
        return import_hf(source[3:])
    ckpt = load_checkpoint(source, train_state=False)
    return ckpt.model_config, ckpt.model_state


def base_record(init_from: str, state: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """base.json of a LoRA run started from `init_from` whose weights are `state`: init_from as
    given, the folder it resolves to now (absolute: a `latest` pointer moves on), the fingerprint."""
    if init_from.startswith("hf:"):
        path = "hf:" + str(Path(init_from[3:]).resolve())
    else:
        path = str(resolve_checkpoint(init_from).resolve())
    return {"init_from": init_from, "path": path, "fingerprint": weights_fingerprint(state)}


def _exists(source: str) -> bool:
    return Path(source[3:] if source.startswith("hf:") else source).exists()


def _load_adapter(folder: Path, model_config: LlamaConfig, base: Optional[str]) -> AdapterState:
    """The adapter of a LoRA checkpoint with its base's weights, read from `base` if given, else
    from the folder base.json names (or its init_from, relative to here, if that is gone)."""
    record = _read_json(folder / BASE)
    if not {"init_from", "path", "fingerprint"} <= set(record):
        raise CheckpointError(f"{folder / BASE} is corrupt: it needs init_from, path and fingerprint")
    named = f"{record['path']} (init_from={record['init_from']}, weights fingerprint {record['fingerprint']})"
    source = base or next((s for s in (record["path"], record["init_from"]) if _exists(s)), None)
    if source is None:
        raise CheckpointError(
            f"checkpoint {folder} holds a LoRA adapter whose base is gone: {named}. Give the base "
            "model with init_from=<its run folder, checkpoint or hf:<folder>>"
        )
    try:
        _, base_state = load_weights(source)
    except CheckpointError as e:
        raise CheckpointError(f"the base of the LoRA checkpoint {folder} cannot be read: {e}") from e
    given = base_record(source, base_state)
    if given["fingerprint"] != record["fingerprint"]:
        where = source if given["path"] in (source, "hf:" + source) else f"{source} -> {given['path']}"
        raise CheckpointError(
            f"wrong base for the LoRA checkpoint {folder}: it was trained on {named}, but the base "
            f"given, {where}, has weights fingerprint {given['fingerprint']}. Give "
            "init_from=<the base it was trained on>"
        )
    with torch.device("meta"):  # only the layers' names and shapes are needed to check the adapter
        skeleton = LlamaForCausalLM(model_config)
    config, names, tensors = read_peft_adapter(folder, skeleton)
    return AdapterState(config, names, tensors, record, source, base_state)


def build_model(ckpt: LoadedCheckpoint, device: torch.device | str = "cpu") -> torch.nn.Module:
    """LlamaForCausalLM with the checkpoint's config and weights, in eval mode on `device`."""
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


def save_weights(
    path: Path, state: Dict[str, torch.Tensor], model_config: LlamaConfig, dtype: Optional[torch.dtype] = None
) -> None:
    """Write `state` as Hugging Face stores it (checkpoints and the HF export share this): HF key
    names, a tied lm_head once (as model.embed_tokens.weight), contiguous CPU tensors, cast to
    `dtype` if given."""
    tensors = {
        k: v.detach().to("cpu", dtype).contiguous() for k, v in drop_tied_head(state, model_config).items()
    }
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    model_config: LlamaConfig,
    job: JobConfig,
    tokenizer_path: Path,
    meta: Dict[str, Any],
    train_state: Optional[Dict[str, Any]],
    base: Optional[Dict[str, str]] = None,
    shards: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write checkpoints/step_<step>/ atomically under `root` (a run's checkpoints/ folder) and
    point `latest` at it. `model` must be the unwrapped module (no DDP/compile wrapper). A model
    with LoRA adapters saves them alone, with `base` (base_record) naming the weights they adapt.
    shards: writes the weights of a sharded model instead, shards(<the folder's dcp/>), which
    every process fills with its part (the other processes join that collective call)."""
    final = root / f"step_{step}"
    adapted = bool(lora_modules(model))
    if adapted and base is None:
        raise ValueError("a model with LoRA adapters is saved with base=base_record(...) naming its base")
    with building_folder(final, overwrite=True) as tmp:
        if adapted:
            write_peft_files(tmp, model_peft_config(model, base["path"]), lora_state_dict(model))
            (tmp / BASE).write_text(json.dumps(base, indent=2))
        elif shards is not None:
            shards(tmp / DCP)
        else:
            save_weights(tmp / WEIGHTS, model.state_dict(), model_config)
        (tmp / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(model_config), indent=2))
        (tmp / RUN_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(job)))
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2))
    write_text_atomic(root / LATEST, final.name + "\n")  # last: it names only complete folders
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The step_<N> folder that `root`/latest names (`root`: a run's checkpoints/), or None."""
    pointer = root / LATEST
    return resolve_checkpoint(pointer) if pointer.is_file() else None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders under `root` and the one with the lowest
    validation loss, which the `best` pointer then names."""
    folders = sorted(
        (p for p in root.glob("step_*") if (p / META).is_file()), key=lambda p: int(p.name.split("_")[1])
    )
    losses = {p: _read_json(p / META).get("val_loss") for p in folders}
    scored = [p for p in folders if losses[p] is not None]
    keep = set(folders[-keep_last:])
    if scored:
        best = min(scored, key=lambda p: losses[p])
        keep.add(best)
        write_text_atomic(root / BEST, best.name + "\n")
    for p in folders:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def load_for_inference(job: JobConfig, rope_type: Optional[str] = None, rope_factor: float = 1.0):
    """What the evaluate, sample and export stages start from: the checkpoint named by
    job.checkpoint_path (default run.dir) without its training state, its model in eval mode on
    run.device, and its tokenizer. rope_type/rope_factor replace the trained RoPE scaling (e.g.
    a model trained at 256 tokens evaluated at 1024). Returns (ckpt, model, tokenizer, device)."""
    # init_from, when given, names the base of a LoRA checkpoint (checked against its fingerprint).
    ckpt = load_checkpoint(job.checkpoint_path or run_dir_of(job), train_state=False, base=job.init_from)
    if rope_type is not None:
        rope = {"rope_type": rope_type, "factor": float(rope_factor)}
        if rope_type == "llama3":
            rope.update(
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=ckpt.model_config.max_position_embeddings,
            )
        ckpt.model_config = dataclasses.replace(ckpt.model_config, rope_scaling=rope)
    device = pick_device(job.run.device)
    return ckpt, build_model(ckpt, device), Tokenizer.load(ckpt.tokenizer_path), device
