"""Evaluation: figures equal a direct computation, bits per byte by hand, the stage writes its
results into the run folder and refuses missing or corrupt checkpoints without writing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyllama.errors import CheckpointError
from tinyllama.evaluate import TokenBytes, evaluate_loss, run_evaluation, text_batches
from tinyllama.tokenizer import ensure_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = "Once upon a time, a café served naïve robots 3 crêpes — and one 🤖 smiled.\n  The end. "


def test_loss_and_loss_by_position_equal_a_direct_computation(saved_run):
    job, model, tok = saved_run
    docs = [TEXT, "Tom had a red ball. He liked it.", "The sun was hot and the sea was blue."] * 3
    windows = torch.cat([x for x, _ in text_batches(tok, docs, batch_size=2, seq_len=16)])  # (N, 16)
    result = evaluate_loss(
        model, text_batches(tok, docs, 2, 16), "cpu", token_bytes=TokenBytes(tok), by_position=True
    )
    ids = [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    full = torch.tensor(ids[: windows.shape[0] * 17]).view(-1, 17)  # x and its next tokens
    with torch.no_grad():  # the model's own shifted-label loss, one window at a time
        per_window = [model(w[None], labels=w[None]).loss for w in full]
        logp = model(full[:, :-1]).logits.log_softmax(-1)  # (N, 16, V)
    nll = -logp.gather(-1, full[:, 1:, None])[..., 0]  # (N, 16)
    assert result["tokens"] == full.shape[0] * 16
    assert result["loss"] == pytest.approx(torch.stack(per_window).mean().item(), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["loss_by_position"] == pytest.approx(nll.mean(0).tolist(), rel=1e-5)


def test_bits_per_byte_by_hand_on_a_small_text(saved_run):
    _, model, tok = saved_run
    ids = torch.tensor([tok.encode(TEXT, bos=True, eos=True)])  # one window: <s> text </s>
    with torch.no_grad():
        nats = model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    expected = nats / (math.log(2) * len(TEXT.encode("utf-8")))
    result = evaluate_loss(
        model, text_batches(tok, [TEXT], 1, ids.shape[1] - 1), "cpu", token_bytes=TokenBytes(tok)
    )
    assert result["bytes"] == len(TEXT.encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-6)


def test_token_bytes_of_a_packed_stream_sum_to_the_text_bytes(tiny_data):
    from tinyllama.data import iter_documents

    data, tok_cfg = tiny_data
    tok = ensure_tokenizer(tok_cfg, data)
    docs = list(iter_documents(data, "val"))[:30] + [TEXT, " leading space", "", "digits 2024"]
    stream = torch.tensor([i for d in docs for i in tok.encode(d, bos=True, eos=True)])
    counted = TokenBytes(tok).count(stream[None, :-1], stream[None, 1:])
    assert counted.item() == sum(len(d.encode("utf-8")) for d in docs)


def test_stage_writes_results_into_the_run_folder(saved_run):
    job, model, tok = saved_run
    job.evaluate.max_batches, job.evaluate.seq_len = 2, 48  # longer than the trained 32
    job.evaluate.rope_type, job.evaluate.rope_factor = "linear", 2.0
    result = run_evaluation(job)
    out = Path(job.run.dir) / "eval" / "step_20-val-T48-linear2"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["loss"] == result["loss"] and saved["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert len(saved["loss_by_position"]) == 48 and saved["tokens"] == 2 * 8 * 48
    assert out.with_suffix(".png").stat().st_size > 0
    assert out.with_suffix(".tsv").read_text().startswith("position\tloss\n0-2\t")


def test_stage_evaluates_the_users_own_text_files(saved_run, tmp_path):
    job, model, tok = saved_run
    notes = tmp_path / "notes.txt"
    docs = [f"Story {i}: Tom had a red ball, and the café was naïve." for i in range(12)]
    notes.write_text("\n\n".join(docs), encoding="utf-8")
    job.data.doc_separator = "blank_lines"
    job.evaluate.files = [str(notes)]
    result = run_evaluation(job)
    expected = evaluate_loss(model, text_batches(tok, docs, 8, 32), "cpu", token_bytes=TokenBytes(tok))
    assert result["source"] == "notes" and result["tokens"] == expected["tokens"]
    assert result["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    assert (Path(job.run.dir) / "eval" / "step_20-notes-T32.json").is_file()


def test_missing_or_corrupt_checkpoints_are_refused_without_writing(saved_run, tmp_path):
    job, _, _ = saved_run
    run = Path(job.run.dir)
    (run / "checkpoints" / "step_20" / "model.safetensors").write_bytes(b"\x00" * 100)  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        run_evaluation(job)
    job.run.dir = str(tmp_path / "empty_run")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_evaluation(job)
    assert not (run / "eval").exists() and not (tmp_path / "empty_run").exists()


def test_cli_prints_one_clear_error_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), f"run.dir={tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no checkpoint at") and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no .hydra/, no outputs/


# ---- chat runs: loss on assistant tokens and answer accuracy --------------------------------


def _chat_run(folder: Path, tokenizer, data, teach=(), seq_len: int = 256):
    """A run folder with a tiny model (random, or trained on the conversations `teach`) at step 1,
    trained at seq_len."""
    from tinyllama.checkpoint import save_checkpoint
    from tinyllama.config import JobConfig, RunConfig
    from tinyllama.model import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=seq_len, **shape)
    )
    if teach:
        from tinyllama.chat_template import IGNORE_INDEX, encode_conversation

        rows = [encode_conversation(tokenizer, c) for c in teach]
        T = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), T), tokenizer.eos_id)
        y = torch.full((len(rows), T), IGNORE_INDEX)
        for i, (ids, labels) in enumerate(rows):
            x[i, : len(ids)], y[i, : len(ids)] = torch.tensor(ids), torch.tensor(labels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(150):
            optimizer.zero_grad()
            model(x, labels=y).loss.backward()
            optimizer.step()
    job = JobConfig(model=model.config, data=data, run=RunConfig(dir=str(folder), seed=3, device="cpu"))
    job.train.seq_len = seq_len
    meta = {"tokens": 0, "tokenizer_fingerprint": tokenizer.fingerprint}
    save_checkpoint(folder / "checkpoints", 1, model, model.config, job, tokenizer.model_path, meta, None)
    return job, model.eval()


# 3 held out, all three ending with a short answer with this seed (half the corpus is drills,
# which have none: a new corpus version may need another seed here).
CHAT_DATA = dict(name="synthetic_chat", source="synthetic_chat", num_docs=150, seed=7)


def test_chat_run_reports_assistant_loss_and_answer_accuracy(chat_tokenizer, tmp_path):
    from tinyllama.chat_template import encode_conversation
    from tinyllama.config import DataConfig
    from tinyllama.data.conversations import iter_conversations

    data = DataConfig(**CHAT_DATA)
    held_out = list(iter_conversations(data, "val"))
    teach = [c["messages"] for c in held_out]
    job, model = _chat_run(tmp_path / "chat", chat_tokenizer, data, teach, seq_len=512)  # one window each
    job.evaluate.batch_size = 2  # two batches, the second one row: padding changes nothing
    result = run_evaluation(job)
    nats = tokens = 0.0
    with torch.no_grad():  # each conversation alone, the model's own loss over its assistant tokens
        for c in held_out:
            ids, labels = encode_conversation(chat_tokenizer, c["messages"])
            n = sum(label != -100 for label in labels[1:])
            nats += model(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            tokens += n
    assert result["assistant_tokens"] == tokens and result["truncated"] == 0
    assert result["assistant_loss"] == pytest.approx(nats / tokens, rel=1e-5)
    # The model learnt these very conversations: every greedy reply is the expected answer.
    assert result["answer_count"] == 3 and result["answer_accuracy"] == 1.0
    assert [e["reply"] for e in result["answer_examples"]] == [c["answer"] for c in held_out]
    kinds = sorted({c["question"] for c in held_out})
    assert list(result["answer_accuracy_by_question"]) == kinds
    assert set(result["answer_accuracy_by_question"].values()) == {1.0}
    assert sum(result["answer_count_by_question"].values()) == 3
    # pass@k from max(k) = 4 samples per question at the run's temperature (sample.temperature).
    assert result["pass_samples"] == 4 and 0 <= result["pass@1"] <= result["pass@4"] <= 1
    saved = json.loads((Path(job.run.dir) / "eval" / "step_1-synthetic_chat_val-chat.json").read_text())
    assert saved == result
    job.evaluate.temperature = 1e-4  # every sample is the greedy reply, which is right
    sharp = run_evaluation(job)
    assert sharp["pass@1"] == sharp["pass@4"] == 1.0
    job.evaluate.max_answers = 1
    assert run_evaluation(job)["answer_count"] == 1


def test_a_held_out_split_without_short_answers_gets_its_loss_and_no_accuracy(chat_tokenizer, tmp_path):
    from tinyllama.config import DataConfig
    from tinyllama.data.conversations import iter_conversations

    data = DataConfig(name="synthetic_chat", source="synthetic_chat", num_docs=60)  # 1 held out
    held_out = list(iter_conversations(data, "val"))
    assert [c["answer"] for c in held_out] == [None]  # a drill or a written story
    job, _ = _chat_run(tmp_path / "chat", chat_tokenizer, data, seq_len=512)
    result = run_evaluation(job)
    assert result["conversations"] == 1 and result["assistant_tokens"] > 0
    assert "answer_accuracy" not in result and "pass@1" not in result


def test_pass_at_k_is_the_unbiased_estimate_from_the_samples_per_question(monkeypatch):
    """Two questions, n = 4 samples each, 1 and 3 of them right: pass@1 = mean(c / n), pass@2 =
    mean(1 - C(n - c, 2) / C(n, 2)) = mean(1 - 3/6, 1 - 0/6), pass@4 = 1 for both."""
    from tinyllama import chat_eval

    asked = [
        {
            "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
            "answer": "a",
        },
        {
            "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
            "answer": "b",
        },
    ]
    replies = ["a", "x", "y", "z", "b", "b", "w", "b"]  # each question's samples adjacent

    def fake_samples(model, tokenizer, prompts, limits, batch_size, temperature, seed=0, weights="float32"):
        assert [p[0]["content"] for p in prompts] == ["q1"] * 4 + ["q2"] * 4 and temperature == 0.7
        return replies

    monkeypatch.setattr(chat_eval, "sampled_replies", fake_samples)
    monkeypatch.setattr(chat_eval, "_limits", lambda tokenizer, asked: [4] * len(asked))
    out = chat_eval.pass_at_k(None, None, asked, ks=(1, 2, 4), temperature=0.7)
    assert out["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert out["pass@2"] == pytest.approx((1 - 3 / 6 + 1) / 2)
    assert out["pass@4"] == 1.0 and out["pass_samples"] == 4


def test_a_base_run_is_measured_on_the_built_in_questions_when_asked(chat_tokenizer, tmp_path):
    from tinyllama.config import DataConfig

    stories = DataConfig(num_docs=100, num_workers=0, root=str(tmp_path / "data"))
    job, _ = _chat_run(tmp_path / "base", chat_tokenizer, stories)  # pretrained on stories
    job.evaluate.max_batches = 1
    assert "assistant_loss" not in run_evaluation(job)  # its own data: text windows, as before
    job.data, job.evaluate.source = DataConfig(**CHAT_DATA), "data"
    result = run_evaluation(job)
    assert result["source"] == "synthetic_chat/val" and result["answer_count"] == 3
    assert result["answer_accuracy"] == 0.0  # an untrained model copies no answer
