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


# A tiny chat model taught two replies (the chat and serve tests share it: trained once a session).
TAUGHT_QUESTION = "Who is the story about?"
TAUGHT = [
    [{"role": "user", "content": TAUGHT_QUESTION}, {"role": "assistant", "content": "Mia"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where does Tom live?"},
        {"role": "assistant", "content": "in a small town"},
    ],
]


def _tiny_chat_model(vocab_size: int, context: int = 128, **config):
    from tinyllama.model import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            **config,
        )
    )


def _memorize(model, tokenizer, conversations, steps: int = 120):
    """Train `model` on the assistant tokens of `conversations` until it replies with them."""
    from tinyllama.chat_template import IGNORE_INDEX, encode_conversation

    rows = [encode_conversation(tokenizer, c) for c in conversations]
    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T), tokenizer.eos_id)
    y = torch.full((len(rows), T), IGNORE_INDEX)
    for i, (ids, labels) in enumerate(rows):
        x[i, : len(ids)], y[i, : len(ids)] = torch.tensor(ids), torch.tensor(labels)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x, labels=y).loss.backward()
        optimizer.step()
    return model.eval()


def _save_chat_run(folder: Path, model, tokenizer, data):
    """A run folder with `model` at step 1, its data `data`; returns the job that names it."""
    from tinyllama.checkpoint import save_checkpoint
    from tinyllama.config import JobConfig, RunConfig

    job = JobConfig(model=model.config, data=data, run=RunConfig(dir=str(folder), seed=3, device="cpu"))
    save_checkpoint(
        folder / "checkpoints",
        1,
        model,
        model.config,
        job,
        tokenizer.model_path,
        {"tokens": 0, "tokenizer_fingerprint": tokenizer.fingerprint},
        None,
    )
    return job


@pytest.fixture(scope="session")
def taught_conversations() -> list:
    """The conversations `taught` replies to; the first asks TAUGHT_QUESTION, answered "Mia"."""
    return TAUGHT


@pytest.fixture(scope="session")
def taught(chat_tokenizer):
    """(model, tokenizer): a tiny model (context 128) that replies "Mia<|end|>" to "Who is the
    story about?" and "in a small town<|end|>" to the second taught conversation."""
    return _memorize(_tiny_chat_model(chat_tokenizer.vocab_size), chat_tokenizer, TAUGHT), chat_tokenizer


@pytest.fixture
def tiny_chat_model():
    """tiny_chat_model(vocab_size, context=128, **config): an untrained 2-layer chat-sized model
    (config: other LlamaConfig fields)."""
    return _tiny_chat_model


@pytest.fixture
def save_chat_run():
    """save_chat_run(folder, model, tokenizer, data) -> JobConfig: a run folder holding `model`."""
    return _save_chat_run
