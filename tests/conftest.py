"""Fixtures shared across the suite. Each area (model, data, train, ...) keeps its own
fixtures in its own tests/<area>/conftest.py; only cross-area fixtures live here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Two cores: keep torch from oversubscribing them when pytest-xdist runs two workers.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora beside the checkout (../shared/data); skip when absent (fresh machines)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(DataConfig, TokenizerConfig): 400 synthetic stories (~120k tokens, val ~2.6k tokens),
    BPE vocab 512. data.root is a session tmp folder that already holds the trained tokenizer
    and the packed shards, so ensure_tokenizer / ensure_packed with these configs reuse them."""
    from tinyllama.config import DataConfig, TokenizerConfig
    from tinyllama.data import ensure_packed
    from tinyllama.tokenizer import ensure_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    data = DataConfig(
        name="synthetic", source="synthetic", num_docs=400, seed=1234, num_workers=0, root=str(root)
    )
    tok = TokenizerConfig(name="bpe_512", vocab_size=512, num_threads=1)
    ensure_packed(data, ensure_tokenizer(tok, data))
    return data, tok


@pytest.fixture
def tiny_job(tiny_data, tmp_path):
    """JobConfig for a seconds-long CPU run: a ~0.1M-parameter model on tiny_data's tokenizer and
    packed shards, 20 steps of 8 x 32 tokens, evaluation and checkpoints every 10 steps, a log line
    every step, run.dir = tmp_path/run. Tests change fields in place (it is a fresh object)."""
    from tinyllama.config import (
        CheckpointConfig,
        EvalConfig,
        JobConfig,
        OptimConfig,
        RunConfig,
        SampleConfig,
        TrainConfig,
    )
    from tinyllama.model import LlamaConfig

    data, tok = tiny_data
    return JobConfig(
        model=LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        tokenizer=tok,
        data=data,
        train=TrainConfig(max_steps=20, batch_size=8, seq_len=32, precision="fp32", log_every=1),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        checkpoint=CheckpointConfig(every=10, keep_last=2),
        eval=EvalConfig(every=10, batches=4),
        run=RunConfig(name="tiny", dir=str(tmp_path / "run"), seed=1, device="cpu"),
        sample=SampleConfig(num_samples=1, max_new_tokens=16),
    )


@pytest.fixture
def saved_run(tiny_job):
    """(job, model, tokenizer): tiny_job with a checkpoint at step 20 in its run folder (random
    weights, no training), for the stages that start from a checkpoint (evaluate, sample, export).
    job.data is replaced by a copy, so tests may change it without touching the session's."""
    import dataclasses

    from tinyllama.checkpoint import save_checkpoint
    from tinyllama.model import LlamaForCausalLM
    from tinyllama.tokenizer import ensure_tokenizer

    tiny_job.data = dataclasses.replace(tiny_job.data)
    tok = ensure_tokenizer(tiny_job.tokenizer, tiny_job.data)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_job.model)
    save_checkpoint(
        Path(tiny_job.run.dir) / "checkpoints",
        20,
        model,
        tiny_job.model,
        tiny_job,
        tok.model_path,
        {"tokens": 0, "tokenizer_fingerprint": tok.fingerprint},
        None,
    )
    return tiny_job, model.eval(), tok


@pytest.fixture
def tiny_overrides(tiny_data) -> list:
    """`python train.py` command-line overrides that reproduce the tiny_data fixture (so its
    tokenizer and packed shards are reused) with a seconds-long model and schedule."""
    data, tok = tiny_data
    return [
        f"data.root={data.root}",
        f"data.num_docs={data.num_docs}",
        f"data.seed={data.seed}",
        "data.num_workers=0",
        f"tokenizer.name={tok.name}",
        f"tokenizer.vocab_size={tok.vocab_size}",
        "tokenizer.num_threads=1",
        f"model.vocab_size={tok.vocab_size}",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_hidden_layers=1",
        "model.max_position_embeddings=32",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.seq_len=16",
        "train.log_every=1",
        "eval.every=2",
        "eval.batches=1",
        "checkpoint.every=2",
        "sample.num_samples=1",
        "sample.max_new_tokens=2",
        "run.device=cpu",
    ]


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_data):
    """tiny_data's tokenizer (BPE 512): like every default tokenizer it has the chat template's
    pieces, so the chat tests reuse it instead of training another."""
    from tinyllama.chat_template import missing_pieces
    from tinyllama.tokenizer import ensure_tokenizer

    data, tok = tiny_data
    tokenizer = ensure_tokenizer(tok, data)
    assert not missing_pieces(tokenizer)
    return tokenizer
