"""What the loop trains on: the tokenizer and packed data (made if missing), and the model
(fresh, or starting from the weights of a checkpoint or a Hugging Face folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from tinyllama.checkpoint import config_differences, load_checkpoint
from tinyllama.config import JobConfig
from tinyllama.data import ensure_packed
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.export import import_hf
from tinyllama.model import LlamaForCausalLM
from tinyllama.model.config import LlamaConfig
from tinyllama.tokenizer import Tokenizer, ensure_tokenizer
from tinyllama.train.distributed import DistEnv

# LlamaConfig fields that change how a model runs, not what its weights mean.
RUNTIME_FIELDS = {"attn_implementation", "attention_dropout", "initializer_range"}


def prepare_data(job: JobConfig, env: DistEnv) -> Tuple[Tokenizer, Path]:
    """Tokenizer and packed shards for job.data/job.tokenizer, made by rank 0 when missing while
    the other ranks wait, then reused by every rank (both stages are idempotent)."""
    if env.is_main:
        tokenizer = ensure_tokenizer(job.tokenizer, job.data)
        packed = ensure_packed(job.data, tokenizer)
    env.barrier()
    if not env.is_main:  # rank 0 has made them: these calls only load and check
        tokenizer = ensure_tokenizer(job.tokenizer, job.data)
        packed = ensure_packed(job.data, tokenizer)
    return tokenizer, packed


def check_vocab(model_config: LlamaConfig, tokenizer) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{model_config.vocab_size}: set model.vocab_size={tokenizer.vocab_size} "
            f"or a smaller tokenizer.vocab_size"
        )


def weight_differences(source: LlamaConfig, target: LlamaConfig) -> list:
    """config_differences that matter for loading weights (runtime-only fields ignored)."""
    return [
        d
        for d in config_differences(source, target)
        if d.split(":")[0].removeprefix("model.") not in RUNTIME_FIELDS
    ]


def initial_weights(init_from: str, model_config: LlamaConfig) -> Dict[str, torch.Tensor]:
    """State dict from a checkpoint/run folder or from "hf:<local Hugging Face folder>"; refused
    with the differing fields named when its architecture differs from model_config."""
    if init_from.startswith("hf:"):
        source_config, state = import_hf(init_from[3:])
    else:
        ckpt = load_checkpoint(init_from, train_state=False)
        source_config, state = ckpt.model_config, ckpt.model_state
    diffs = weight_differences(source_config, model_config)
    if diffs:
        raise CheckpointError(
            f"init_from={init_from} has another architecture than this "
            "config:\n  " + "\n  ".join(diffs) + "\nset the model fields to match"
        )
    return state


def build_training_model(job: JobConfig, tokenizer, device: torch.device) -> torch.nn.Module:
    """LlamaForCausalLM(job.model) initialised from run.seed (identical on every rank), or
    loaded from job.init_from; gradient checkpointing set as configured; on `device`."""
    check_vocab(job.model, tokenizer)
    torch.manual_seed(job.run.seed)
    model = LlamaForCausalLM(job.model)
    if job.init_from:
        model.load_state_dict(initial_weights(job.init_from, job.model))
    model.model.gradient_checkpointing = job.train.grad_checkpointing
    model.chunked_loss = job.train.grad_checkpointing  # else the (B, T, V) logits outweigh the saving
    return model.to(device)
