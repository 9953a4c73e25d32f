"""Supervised fine-tuning through the one training loop: conversations packed on disk, labels that
reach the model, packing that changes nothing, exact resume, and the refusals (seconds per run)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tinyllama.chat_template import IGNORE_INDEX, encode_conversation
from tinyllama.checkpoint import load_checkpoint
from tinyllama.config import (
    SampleConfig,
)
from tinyllama.data import (
    SFTBatchLoader,
    ensure_chat_packed,
    read_chat_meta,
    sft_eval_batches,
    synthetic_chat,
)
from tinyllama.data.conversations import iter_conversations
from tinyllama.errors import CheckpointError, ConfigError, DataError
from tinyllama.losses import evaluate_loss
from tinyllama.model import LlamaForCausalLM, causal_lm_loss
from tinyllama.train import loop
from tinyllama.train.distributed import setup_distributed
from tinyllama.train.loop import Trainer, run_training

SEQ_LEN = 256  # the synthetic chat conversations are 130-340 tokens with a 512-piece tokenizer


def metrics(job):
    lines = (loop.run_dir_of(job) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(job):
    return {m["step"]: m["loss"] for m in metrics(job) if "loss" in m}


def test_a_chat_run_trains_end_to_end_and_reports_its_packing(chat_job, capsys):
    final = run_training(chat_job)
    out = capsys.readouterr().out
    assert "tokenizer: the base model's, from init_from=" in out
    assert "truncated and" in out and "real tokens" in out  # the packing report, before step 1
    assert out.index("real tokens") < out.index("step 3: val_loss")
    lines = [m for m in metrics(chat_job) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(0 < m["loss_share"] < m["real_share"] <= 1 for m in lines)
    summary = json.loads((loop.run_dir_of(chat_job) / "summary.json").read_text())
    assert summary["final_val_loss"] == final and 0 < summary["loss_share"] < summary["real_share"] <= 1
    # The samples are replies to a held-out conversation, next to the reply it holds.
    first = next(iter_conversations(chat_job.data, "val"))["messages"]
    samples = (loop.run_dir_of(chat_job) / "samples.txt").read_text()
    assert f"user: {first[-2]['content']}\nassistant (greedy): " in samples
    assert samples.rstrip().endswith(f"expected: {first[-1]['content']}") and "samples (" in out
    ckpt = load_checkpoint(loop.run_dir_of(chat_job))
    assert (
        ckpt.step == 6
        and ckpt.tokenizer_fingerprint
        == read_chat_meta(loop.prepare_data(chat_job, setup_distributed("cpu"))[1])["tokenizer"][
            "fingerprint"
        ]
    )


def test_chat_samples_prompt_up_to_the_last_reply_and_skip_what_does_not_fit(
    chat_job, chat_tokenizer, tmp_path
):
    from tinyllama.train.samples import write_chat_samples

    torch.manual_seed(0)
    model = LlamaForCausalLM(chat_job.model)  # the context given below (64) is what counts

    def turn(role, text):
        return {"role": role, "content": text}

    conversations = [
        {"messages": [turn("user", "a long story " * 40), turn("assistant", "too long")]},  # no room
        {"messages": [turn("user", "Hi"), turn("assistant", "Hello"), turn("user", "Bye")]},
    ]
    printed = []
    cfg = SampleConfig(num_samples=2, max_new_tokens=200)
    write_chat_samples(model, chat_tokenizer, cfg, conversations, 64, tmp_path / "s.txt", printed.append)
    text = (tmp_path / "s.txt").read_text()
    assert text.startswith("user: Hi\nassistant (greedy): ") and text.rstrip().endswith("expected: Hello")
    assert "too long" not in text and "Bye" not in text and "---" not in text

    def unreadable():
        raise DataError("the dataset is gone")
        yield

    write_chat_samples(model, chat_tokenizer, cfg, unreadable(), 64, tmp_path / "t.txt", printed.append)
    assert (
        not (tmp_path / "t.txt").exists() and "could not be read again (the dataset is gone)" in printed[-1]
    )


def hand_loss(model, tokenizer, conversations, train_on):
    """Mean cross-entropy over the labelled tokens of each conversation run ALONE (no packing, no
    mask, positions from 0), its labels built by encode_conversation."""
    nats, count = 0.0, 0
    for c in conversations:
        ids, labels = encode_conversation(tokenizer, c["messages"], train_on)
        ids, labels = torch.tensor([ids]), torch.tensor([labels])
        targets = torch.cat([labels[:, 1:], torch.full((1, 1), IGNORE_INDEX)], 1)
        with torch.no_grad():
            per_token = causal_lm_loss(model(ids).logits, targets, reduction="none")
        nats += per_token.sum().item()
        count += int((targets != IGNORE_INDEX).sum())
    return nats / count


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_the_loop_loss_is_the_mean_over_the_labelled_tokens_of_each_conversation(
    chat_job, chat_tokenizer, train_on
):
    chat_job.data.train_on = train_on
    trainer = Trainer(chat_job, setup_distributed("cpu"))
    # The trainer's first batch, read again by a loader with the same seed.
    same = SFTBatchLoader(trainer.packed_dir, "train", 4, SEQ_LEN, seed=chat_job.run.seed)
    batch = same.next_batch()
    loss, _ = trainer.forward_backward()
    # Which conversations are in the batch: windows hold them in corpus order; map by their ids.
    convs = list(iter_conversations(chat_job.data, "train"))
    wanted = []
    for row in batch.inputs["input_ids"].tolist():
        for c in convs:
            ids = encode_conversation(chat_tokenizer, c["messages"])[0]
            if any(row[i : i + len(ids)] == ids for i in range(len(row) - len(ids) + 1)):
                wanted.append(c)
    assert len(wanted) >= 4
    model = copy.deepcopy(trainer.model).eval()
    # forward_backward ran before any optimizer step: the weights are still the base's.
    assert loss == pytest.approx(hand_loss(model, chat_tokenizer, wanted, train_on), rel=1e-5)
    share = batch.loss_tokens / batch.inputs["input_ids"].numel()
    assert (share > 0.5) == (train_on == "all")  # answers are short: few tokens carry loss


def test_packed_and_padded_windows_give_each_conversation_the_same_loss(chat_job, chat_tokenizer):
    torch.manual_seed(3)
    model = LlamaForCausalLM(chat_job.model).eval()
    results = {}
    for packing in ("packed", "padded"):
        data = dataclasses.replace(chat_job.data, packing=packing)
        folder = ensure_chat_packed(data, chat_tokenizer, SEQ_LEN)
        results[packing] = evaluate_loss(model, sft_eval_batches(folder, "val", 2), "cpu")
        meta = read_chat_meta(folder)["splits"]["val"]
        assert meta["windows"] == (meta["conversations"] if packing == "padded" else meta["windows"])
    assert results["packed"]["tokens"] == results["padded"]["tokens"]
    assert results["packed"]["loss"] == pytest.approx(results["padded"]["loss"], rel=1e-5)
    val = list(iter_conversations(chat_job.data, "val"))
    assert results["padded"]["loss"] == pytest.approx(
        hand_loss(model, chat_tokenizer, val, "assistant"), rel=1e-5
    )


def test_the_built_in_corpus_packed_with_other_settings_or_generator_is_refused(
    chat_job, chat_tokenizer, monkeypatch
):
    folder = ensure_chat_packed(chat_job.data, chat_tokenizer, SEQ_LEN)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    other_size = dataclasses.replace(chat_job.data, num_docs=chat_job.data.num_docs + 1)
    with pytest.raises(DataError, match="packed from another source"):
        ensure_chat_packed(other_size, chat_tokenizer, SEQ_LEN)
    monkeypatch.setattr(synthetic_chat, "VERSION", synthetic_chat.VERSION + 1)
    with pytest.raises(DataError, match="packed from another source"):
        ensure_chat_packed(chat_job.data, chat_tokenizer, SEQ_LEN)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_a_loader_state_from_other_data_is_refused_on_resume(chat_job, chat_tokenizer):
    folder = ensure_chat_packed(chat_job.data, chat_tokenizer, SEQ_LEN)
    state = SFTBatchLoader(folder, "train", 4, SEQ_LEN, seed=1).state_dict()
    assert state["source"] == read_chat_meta(folder)["source"]
    other = dict(state, source=dict(state["source"], version=0))  # a corpus of another generator
    with pytest.raises(DataError, match="cannot resume the data loader exactly: the saved source is"):
        SFTBatchLoader(folder, "train", 4, SEQ_LEN, seed=1).load_state_dict(other)
    older = {k: v for k, v in state.items() if k != "source"}  # a checkpoint saved before the check
    SFTBatchLoader(folder, "train", 4, SEQ_LEN, seed=1).load_state_dict(older)


def test_a_resumed_chat_run_gives_the_same_losses(chat_job, tmp_path, monkeypatch):
    straight = copy.deepcopy(chat_job)
    straight.run.dir = str(tmp_path / "straight")
    run_training(straight)
    real = Trainer.optimizer_step

    def stop_at_3(self, loss, grad_norm):
        real(self, loss, grad_norm)
        if self.step + 1 == 3:
            import signal

            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "optimizer_step", stop_at_3)
        run_training(chat_job)
    assert load_checkpoint(loop.run_dir_of(chat_job)).step == 3
    run_training(chat_job)
    assert train_losses(chat_job) == train_losses(straight)  # exact, all 6 steps


def test_grad_checkpointing_and_the_chunked_loss_take_the_sft_batch(chat_job, tmp_path):
    chat_job.train.max_steps = 2
    gc = copy.deepcopy(chat_job)
    gc.train.grad_checkpointing, gc.run.dir = True, str(tmp_path / "gc")
    run_training(chat_job)
    run_training(gc)  # the chunked loss: -100 targets, packed mask and positions under recompute
    a, b = train_losses(chat_job), train_losses(gc)
    torch.testing.assert_close(list(a.values()), list(b.values()), rtol=1e-6, atol=1e-6)


def test_compile_takes_the_sft_batch(chat_job, tmp_path, monkeypatch):
    """torch.compile traces the packed batch (aot_eager: the graph capture without the C++
    compiler, which CPU test machines may lack or take minutes with)."""
    chat_job.train.max_steps, chat_job.train.compile = 2, True
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: real(m, backend="aot_eager", **k))
    plain = copy.deepcopy(chat_job)
    plain.train.compile, plain.run.dir = False, str(tmp_path / "plain")
    run_training(chat_job)
    run_training(plain)
    a, b = train_losses(chat_job), train_losses(plain)
    torch.testing.assert_close(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-5)


def test_a_tokenizer_without_chat_pieces_is_refused_with_nothing_written(
    chat_job, tiny_data, tmp_path, base_run_of
):
    from tinyllama.tokenizer import ensure_tokenizer

    data, tok = tiny_data
    plain = ensure_tokenizer(dataclasses.replace(tok, name="no_chat_pieces", user_defined_symbols=[]), data)
    chat_job.model.vocab_size = plain.vocab_size
    chat_job.init_from = str(base_run_of(tmp_path / "plain_base", chat_job.model, plain))
    with pytest.raises(ConfigError, match="no chat pieces"):
        run_training(chat_job)
    assert not Path(chat_job.run.dir).exists() and not (Path(chat_job.data.root) / "packed").exists()


def test_a_missing_base_run_says_to_make_it(chat_job, tmp_path):
    chat_job.init_from = str(tmp_path / "runs" / "demo")
    with pytest.raises(CheckpointError, match="make demo"):
        run_training(chat_job)
    chat_job.init_from = None
    with pytest.raises(ConfigError, match="init_from"):
        run_training(chat_job)
    assert not Path(chat_job.run.dir).exists()


def test_conversations_longer_than_the_window_are_counted_and_reported(
    chat_job, chat_tokenizer, capsys, base_run_of
):
    chat_job.model.max_position_embeddings = chat_job.train.seq_len = 200
    chat_job.train.max_steps = 1
    for overflow in ("truncate", "drop"):
        chat_job.data.overflow = overflow
        chat_job.run.dir = f"{chat_job.run.dir}_{overflow}"
        chat_job.init_from = str(
            base_run_of(Path(chat_job.run.dir + "_base"), chat_job.model, chat_tokenizer)
        )
        run_training(chat_job)
        folder = loop.prepare_data(chat_job, setup_distributed("cpu"))[1]
        train = read_chat_meta(folder)["splits"]["train"]
        if overflow == "truncate":
            assert train["truncated"] > 0
        else:
            assert train["dropped"] > 0 and train["truncated"] == 0
        report = f"{train['truncated']} truncated and {train['dropped']} dropped"
        assert report in capsys.readouterr().out


def test_ddp_two_processes_fine_tune_as_one_process_with_twice_the_accumulation(chat_job, tmp_path):
    """One sequence per rank and micro-batch, so both runs average the same per-window means."""
    import subprocess
    import sys

    from tinyllama.cli import job_config_args

    chat_job.data.num_docs, chat_job.data.packing = 100, "padded"  # 2 held-out windows: 1 per rank
    chat_job.train.max_steps, chat_job.train.batch_size = 3, 1
    chat_job.eval.every, chat_job.eval.batches, chat_job.checkpoint.every = 3, 0, 3
    ddp, single = copy.deepcopy(chat_job), copy.deepcopy(chat_job)
    ddp.run.dir, single.run.dir, single.train.grad_accum = str(tmp_path / "ddp"), str(tmp_path / "one"), 2
    repo = Path(__file__).resolve().parents[2]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        [*torchrun, str(repo / "train.py"), *job_config_args(ddp, tmp_path)],
        cwd=repo,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run_training(single)
    for key in ("loss", "val_loss", "real_share"):
        a = {m["step"]: m[key] for m in metrics(ddp) if key in m}
        b = {m["step"]: m[key] for m in metrics(single) if key in m}
        assert a.keys() == b.keys() and a, key
        if key != "real_share":  # rank 0's batches only, against both micro-batches
            torch.testing.assert_close(list(a.values()), list(b.values()), rtol=1e-5, atol=0, msg=key)
