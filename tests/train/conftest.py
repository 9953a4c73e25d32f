"""Fixtures of the training tests: a fine-tuning job on the built-in chat corpus and its base run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinyllama.checkpoint import save_checkpoint
from tinyllama.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    JobConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
)
from tinyllama.model import LlamaConfig, LlamaForCausalLM

SEQ_LEN = 256  # the synthetic chat conversations are 130-340 tokens with a 512-piece tokenizer


def base_run(folder: Path, model_config: LlamaConfig, tokenizer) -> Path:
    """A pretrained run's folder as init_from sees it: one checkpoint (random weights) and its tokenizer."""
    torch.manual_seed(0)
    job = JobConfig(model=model_config, run=RunConfig(dir=str(folder)))
    save_checkpoint(
        folder / "checkpoints",
        5,
        LlamaForCausalLM(model_config),
        model_config,
        job,
        tokenizer.model_path,
        {"tokens": 0, "tokenizer_fingerprint": tokenizer.fingerprint},
        None,
    )
    return folder


@pytest.fixture
def base_run_of():
    """base_run, for tests that make a base run of their own."""
    return base_run


@pytest.fixture
def chat_job(chat_tokenizer, tmp_path_factory, tmp_path):
    """A 6-step fine-tuning run of a ~50k-parameter model on 60 built-in conversations, from a
    base run that holds chat_tokenizer; packed data in a per-test folder."""
    model = LlamaConfig(
        vocab_size=chat_tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
    )
    base = base_run(tmp_path / "base", model, chat_tokenizer)
    return JobConfig(
        model=model,
        tokenizer=TokenizerConfig(name="bpe_512_chat", vocab_size=512),
        data=DataConfig(
            name="synthetic_chat",
            source="synthetic_chat",
            num_docs=60,
            num_workers=0,
            root=str(tmp_path / "data"),
        ),
        train=TrainConfig(max_steps=6, batch_size=4, seq_len=SEQ_LEN, precision="fp32", log_every=1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        checkpoint=CheckpointConfig(every=3, keep_last=2),
        eval=EvalConfig(every=3, batches=2),
        run=RunConfig(name="chat", dir=str(tmp_path / "run"), seed=1, device="cpu"),
        sample=SampleConfig(num_samples=1, max_new_tokens=4),
        init_from=str(base),
    )
