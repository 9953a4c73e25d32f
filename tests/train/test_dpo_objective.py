"""DPO through the one training loop: TRL's figures in metrics.jsonl, exact resume, the reference
computed ahead giving the same losses, disjoint pairs per rank, and refusals before any write."""

from __future__ import annotations

import copy
import dataclasses
import json
import signal

import pytest
import torch

from tinyllama.checkpoint import load_checkpoint
from tinyllama.errors import DataError
from tinyllama.model import LlamaForCausalLM
from tinyllama.train import loop
from tinyllama.train.distributed import setup_distributed
from tinyllama.train.dpo_objective import FIGURES, DPOObjective, PairOrder
from tinyllama.train.loop import Trainer, run_training

# The built-in pairs of 60 conversations are up to ~300 tokens with tiny_data's 512-piece tokenizer.
DPO_LEN = 320


@pytest.fixture
def dpo_job(chat_job, chat_tokenizer, base_run_of, tmp_path):
    """chat_job as a 6-step DPO run (4 pairs a micro-batch) on the built-in pairs of its 60
    conversations, from a base run with room for the longest of them."""
    job = copy.deepcopy(chat_job)
    job.model = dataclasses.replace(job.model, max_position_embeddings=DPO_LEN)
    job.init_from = str(base_run_of(tmp_path / "dpo_base", job.model, chat_tokenizer))
    job.train.seq_len, job.train.objective = DPO_LEN, "dpo"
    job.dpo.beta = 0.5
    return job


def lines(job):
    text = (loop.run_dir_of(job) / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, text) if "loss" in m]


def test_a_dpo_run_logs_trls_figures(dpo_job):
    dpo_job.dpo.nll_weight = 0.5
    run_training(dpo_job)
    logged = lines(dpo_job)
    assert [m["step"] for m in logged] == list(range(1, 7))
    assert all(set(FIGURES) | {"nll_loss"} <= set(m) for m in logged)
    first = logged[0]  # the policy is the reference at step 1: no reward, log 2 + the NLL term
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/accuracies"] == 0
    assert first["loss"] == pytest.approx(0.6931472 + 0.5 * first["nll_loss"], rel=1e-5)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert any(m["rewards/margins"] != 0 for m in logged[1:])
    summary = json.loads((loop.run_dir_of(dpo_job) / "summary.json").read_text())
    assert summary["dpo_pairs"] == 6 * 4 and 0 <= summary["rewards/accuracies"] <= 1


def test_a_resumed_dpo_run_gives_the_same_losses(dpo_job, tmp_path, monkeypatch):
    straight = copy.deepcopy(dpo_job)
    straight.run.dir = str(tmp_path / "straight")
    run_training(straight)
    real = Trainer.optimizer_step

    def stop_at_3(self, loss, grad_norm):
        real(self, loss, grad_norm)
        if self.step + 1 == 3:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", stop_at_3)
        run_training(dpo_job)
    assert load_checkpoint(loop.run_dir_of(dpo_job)).step == 3
    run_training(dpo_job)  # the reference is init_from's weights again, not the step-3 policy
    resumed, expected = lines(dpo_job), lines(straight)
    for key in ("step", "loss", *FIGURES):  # exact, all 6 steps
        assert [m[key] for m in resumed] == [m[key] for m in expected], key


def test_reference_logps_computed_ahead_give_the_same_losses(dpo_job, tmp_path):
    dpo_job.train.max_steps = 3
    ahead = copy.deepcopy(dpo_job)
    ahead.dpo.precompute_ref, ahead.run.dir = True, str(tmp_path / "ahead")
    run_training(dpo_job)
    run_training(ahead)
    for key in ("loss", *FIGURES):  # batched with other pairs, so equal to float32 rounding
        torch.testing.assert_close(
            [m[key] for m in lines(ahead)], [m[key] for m in lines(dpo_job)], rtol=1e-5, atol=1e-5
        )


def test_ranks_take_disjoint_pairs_and_a_mismatched_resume_is_refused():
    ranks = [PairOrder(10, 2, seed=1, rank=r, world_size=2, digest="d") for r in range(2)]
    epoch = [sum((o.next_indices() for _ in range(2)), []) + o.next_indices()[:1] for o in ranks]
    assert not set(epoch[0]) & set(epoch[1]) and len(set(epoch[0] + epoch[1])) == 10
    state = ranks[0].state_dict()
    assert state == {
        "epoch": 1,
        "position": 2,  # 3 micro-steps x 2 ranks x 2 pairs = 12 = 10 + 2
        "order": "global",
        "seed": 1,
        "world_size": 2,
        "pairs": 10,
        "digest": "d",
    }
    again = PairOrder(10, 2, seed=1, rank=0, world_size=2, digest="d")
    again.load_state_dict(state)
    assert again.next_indices() == ranks[0].next_indices()  # the same second epoch
    for other in (dict(world_size=1, rank=0), dict(digest="other pairs")):
        kwargs = {**dict(n_pairs=10, batch_size=2, seed=1, rank=0, world_size=2, digest="d"), **other}
        with pytest.raises(DataError, match="cannot resume the DPO pairs exactly"):
            PairOrder(**kwargs).load_state_dict(state)


def test_bad_pairs_are_refused_before_anything_is_written(dpo_job, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    ok = {"prompt": "Who is Mia?", "chosen": "A girl", "rejected": "A dog"}
    bad.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "rejected": "A girl"}) + "\n")
    dpo_job.dpo.train_files = [str(bad)]
    with pytest.raises(DataError, match=r"pairs.jsonl:2: chosen and rejected are the same reply"):
        run_training(dpo_job)
    assert not (loop.run_dir_of(dpo_job) / "metrics.jsonl").exists()
    assert not (loop.run_dir_of(dpo_job) / "checkpoints").exists()


def test_a_pair_that_does_not_fit_seq_len_is_refused_before_any_step(dpo_job, chat_tokenizer):
    dpo_job.train.seq_len = 200  # the longest built-in pairs of this corpus are ~300 tokens
    env = setup_distributed("cpu")
    with pytest.raises(
        DataError, match=r"built-in pair of chat example \d+ .*: the prompt with its longer reply"
    ):
        DPOObjective(dpo_job, env, LlamaForCausalLM(dpo_job.model), chat_tokenizer)
