"""The training checkpointer: its schedule (every N, at the end, when forced; once per step),
keep-last-K + best, and a save/load round trip of every stateful object it was handed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tinyllama.checkpoint import load_checkpoint, resolve_checkpoint
from tinyllama.config import CheckpointConfig, JobConfig, TrainConfig
from tinyllama.model import LlamaConfig, LlamaForCausalLM
from tinyllama.train.checkpointer import Attribute, Checkpointer
from tinyllama.train.distributed import DistEnv
from tinyllama.train.nan_guard import NonFiniteLossError

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Losses:
    """Stands in for the Evaluator: the validation loss of each step, and what a resume gave back."""

    def __init__(self, losses=None):
        self.losses, self.remembered = losses or {}, None

    def loss_at(self, step):
        return self.losses.get(step)

    def remember(self, step, loss):
        self.remembered = (step, loss)


class Counter:
    """A per-rank stateful object (as the loader is)."""

    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


@pytest.fixture
def make(tmp_path):
    """make(every, keep_last, max_steps, losses) -> (Checkpointer, run state it was handed)."""
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"sentencepiece-bytes")
    tokenizer = SimpleNamespace(model_path=tok, fingerprint="fp")

    def make(every, keep_last, max_steps, losses=None, model=None):
        torch.manual_seed(0)
        model = model or LlamaForCausalLM(CFG)
        job = JobConfig(
            model=CFG,
            checkpoint=CheckpointConfig(every=every, keep_last=keep_last),
            train=TrainConfig(max_steps=max_steps),
        )
        run = SimpleNamespace(
            step=0,
            tokens=0,
            best=None,
            model=model,
            rank=Counter(),
            optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
            evaluator=Losses(losses),
        )
        states = {
            "step": Attribute(run, "step"),
            "tokens": Attribute(run, "tokens"),
            "best_val_loss": Attribute(run, "best"),
        }
        saver = Checkpointer(
            tmp_path / "run",
            job,
            ENV,
            model,
            tokenizer,
            run.evaluator,
            run.optimizer,
            states,
            {"counter": run.rank},
        )
        return saver, run

    return make


def saving(saver, run, steps, force=()):
    """Call maybe_save after each of `steps` as the loop does; the steps actually saved."""
    saved = []
    for step in steps:
        run.step, run.tokens = step, step * 10
        if saver.maybe_save(step, force=step in force) is not None:
            saved.append(step)
    return saved


def test_keep_last_k_and_the_best(make, tmp_path):
    run_dir = tmp_path / "run"
    saver, run = make(
        every=10, keep_last=2, max_steps=50, losses={10: 3.0, 20: 1.0, 30: 2.0, 40: None, 50: 2.5}
    )
    saving(saver, run, range(1, 51))
    kept = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == [20, 40, 50]
    assert resolve_checkpoint(run_dir / "checkpoints" / "best").name == "step_20"
    assert resolve_checkpoint(run_dir).name == "step_50"
    assert saver.maybe_save(50, force=True) is None  # never saved twice for one step


def test_checkpointer_saves_at_the_end_and_when_forced(make):
    saver, run = make(every=4, keep_last=5, max_steps=10)
    assert saving(saver, run, range(1, 11), force={7}) == [4, 7, 8, 10]


def test_every_state_it_was_handed_round_trips(make, tmp_path):
    saver, run = make(every=3, keep_last=1, max_steps=3, losses={3: 1.5})
    run.model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    run.optimizer.step()
    run.best, run.rank.n = 1.25, 7
    saving(saver, run, [1, 2, 3])
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 3 and ckpt.tokens == 30 and ckpt.val_loss == 1.5
    assert set(ckpt.train_state) == {
        "step",
        "tokens",
        "optimizer",
        "best_val_loss",
        "world_size",
        "parallel",
        "ranks",
    }  # the train_state.pt layout older runs have
    assert ckpt.train_state["ranks"] == [{"counter": {"n": 7}}]

    fresh, again = make(every=3, keep_last=1, max_steps=3, model=LlamaForCausalLM(CFG))
    fresh.load(ckpt)
    assert (again.step, again.tokens, again.best, again.rank.n) == (3, 30, 1.25, 7)
    assert again.evaluator.remembered == (3, 1.5)  # the resumed step is not evaluated again
    assert all(
        torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), run.model.state_dict().values())
    )
    a, b = again.optimizer.state_dict()["state"], run.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_non_finite_weights_are_never_saved(make, tmp_path):
    saver, run = make(every=1, keep_last=1, max_steps=2)
    with torch.no_grad():
        next(run.model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="not finite"):
        saving(saver, run, [1])
    assert not (tmp_path / "run" / "checkpoints" / "step_1").exists()
