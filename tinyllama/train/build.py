"""What the loop trains on: the tokenizer and packed data (made if missing), and the model
(fresh, or starting from the weights of a checkpoint or a Hugging Face folder).

Fine-tuning on conversations (config.is_chat(job.data)) packs them into windows of
train.seq_len (tinyllama.data.sft_data) with the base model's tokenizer: the one of the
init_from checkpoint unless tokenizer.model_file names another; it must hold the chat pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from tinyllama.chat_template import require_chat_pieces
from tinyllama.checkpoint import TOKENIZER, base_record, config_differences, load_weights, resolve_checkpoint
from tinyllama.config import JobConfig, is_chat
from tinyllama.data import ensure_chat_packed, ensure_packed
from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.lora import apply_lora
from tinyllama.model import LlamaForCausalLM
from tinyllama.model.config import LlamaConfig
from tinyllama.tokenizer import Tokenizer, ensure_tokenizer
from tinyllama.train.distributed import DistEnv

# LlamaConfig fields that change how a model runs, not what its weights mean.
RUNTIME_FIELDS = {"attn_implementation", "attention_dropout", "initializer_range"}


def prepare_data(job: JobConfig, env: DistEnv) -> Tuple[Tokenizer, Path]:
    """Tokenizer and packed shards (windows, for conversations) for job.data/job.tokenizer, made
    by rank 0 when missing while the other ranks wait, then reused by every rank (both stages are
    idempotent)."""
    if env.is_main:
        tokenizer, packed = _prepare(job)
    env.barrier()
    if not env.is_main:  # rank 0 has made them: these calls only load and check
        tokenizer, packed = _prepare(job)
    return tokenizer, packed


def _prepare(job: JobConfig) -> Tuple[Tokenizer, Path]:
    if not is_chat(job.data):
        tokenizer = ensure_tokenizer(job.tokenizer, job.data)
        return tokenizer, ensure_packed(job.data, tokenizer)
    tokenizer = chat_tokenizer(job)
    require_chat_pieces(tokenizer)  # before anything is written
    return tokenizer, ensure_chat_packed(job.data, tokenizer, job.train.seq_len)


def chat_tokenizer(job: JobConfig) -> Tokenizer:
    """The tokenizer a fine-tuning run encodes conversations with: tokenizer.model_file if set,
    else the init_from checkpoint's (the base model's ids; a tokenizer trained on the chat data
    would give its embeddings other meanings)."""
    if job.tokenizer.model_file:
        return Tokenizer.load(job.tokenizer.model_file)
    if not job.init_from or job.init_from.startswith("hf:"):
        raise ConfigError(
            f"data={job.data.name} holds conversations: fine-tune a pretrained run with "
            "init_from=<run folder or checkpoint> (its tokenizer is used), or set "
            "tokenizer.model_file to a tokenizer with the chat pieces"
        )
    try:
        folder = resolve_checkpoint(job.init_from)
    except CheckpointError as e:
        raise CheckpointError(
            f"init_from={job.init_from}: {e}. Pretrain the base model first (`make demo` makes "
            "runs/demo, the base of experiment=chat_demo), or set init_from to a pretrained run"
        ) from None
    return Tokenizer.load(folder / TOKENIZER)


def tokenizer_origin(job: JobConfig, tokenizer: Tokenizer) -> str:
    """Where the run's tokenizer comes from, for its first log lines."""
    if is_chat(job.data) and not job.tokenizer.model_file:
        return f"tokenizer: the base model's, from init_from={job.init_from} ({tokenizer.model_path})"
    return f"tokenizer: {tokenizer.model_path}"


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
    source_config, state = load_weights(init_from)
    diffs = weight_differences(source_config, model_config)
    if diffs:
        raise CheckpointError(
            f"init_from={init_from} has another architecture than this "
            "config:\n  " + "\n  ".join(diffs) + "\nset the model fields to match"
        )
    return state


def build_training_model(
    job: JobConfig, tokenizer, device: torch.device
) -> Tuple[torch.nn.Module, Optional[Dict[str, str]]]:
    """LlamaForCausalLM(job.model) initialised from run.seed (identical on every rank), or
    loaded from job.init_from; with finetune.lora.rank, LoRA adapters on the layers it targets
    (the rest frozen); gradient checkpointing set as configured; on `device`.

    Returns (model, base): base is the base record a LoRA run's checkpoints carry
    (checkpoint.base_record: init_from, its folder, its weights' fingerprint), else None."""
    check_vocab(job.model, tokenizer)
    torch.manual_seed(job.run.seed)
    model = LlamaForCausalLM(job.model)
    base = None
    if job.init_from:
        state = initial_weights(job.init_from, job.model)
        model.load_state_dict(state)
        lora = job.finetune.lora
        if lora.rank is not None:
            base = base_record(job.init_from, state)
            # After the seed, so that every rank draws the same A matrices.
            apply_lora(
                model,
                lora.rank,
                lora.alpha,
                lora.dropout,
                list(lora.target_modules),
                list(lora.modules_to_save),
            )
    model.model.gradient_checkpointing = job.train.grad_checkpointing
    model.chunked_loss = job.train.grad_checkpointing  # else the (B, T, V) logits outweigh the saving
    return model.to(device), base
