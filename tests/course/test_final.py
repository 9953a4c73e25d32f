"""The final exercise: the learner's pieces inside the real model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tinyllama.course.final import learner_parts, train_with_learner_pieces
from tinyllama.course.lessons import CourseError
from tinyllama.model import LlamaConfig, LlamaForCausalLM, ModelParts

SOLUTIONS = Path(__file__).resolve().parent / "solutions"
PIECES = ["lesson2_rmsnorm.py", "lesson3_rope.py", "lesson4_attention.py", "lesson5_mlp.py"]


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in PIECES:
        shutil.copy(SOLUTIONS / name, ws / name)
    return ws


def test_learner_model_matches_the_reference_with_the_same_weights(workspace):
    parts, described = learner_parts(workspace)
    assert all(who.startswith("yours") for who in described.values())
    assert parts.norm.__module__.startswith("_course_learner_")
    # The learner's attention rotates with the learner's RoPE functions.
    attention_module = __import__("sys").modules[parts.attention.__module__]
    assert attention_module.apply_rotary_pos_emb.__module__ == parts.rotary.__module__
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    mine = LlamaForCausalLM(config, parts=parts).eval()
    mine.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)


def test_missing_pieces_use_the_reference(workspace):
    (workspace / "lesson4_attention.py").unlink()
    parts, described = learner_parts(workspace)
    assert described["attention"] == "reference" and parts.attention is ModelParts().attention
    assert described["mlp"].startswith("yours")


def test_a_failing_piece_stops_with_its_hint(workspace):
    path = workspace / "lesson3_rope.py"
    path.write_text(path.read_text().replace("torch.cat((-x2, x1), dim=-1)", "torch.cat((-x1, x2), dim=-1)"))
    with pytest.raises(CourseError, match="lesson 3 .*you rotated the wrong half"):
        learner_parts(workspace)


def test_training_with_the_learners_pieces_lowers_the_loss(workspace, tiny_job):
    logged = []
    result = train_with_learner_pieces(tiny_job, workspace, seconds=60, max_steps=25, log=logged.append)
    assert result.steps == 25
    assert result.loss_fell, logged
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5
    assert any("your pieces learn!" in line for line in logged)
    assert any(line.startswith("sample: ") for line in logged)


def test_train_command_composes_the_tiny_preset_and_trains(workspace, tmp_path, capsys):
    from tinyllama.course.__main__ import _compose_job, main

    job = _compose_job(["train.batch_size=4"])
    assert (job.model.hidden_size, job.model.num_hidden_layers) == (128, 4)  # configs/model/tiny.yaml
    assert (job.train.batch_size, job.train.seq_len) == (4, 64)  # the learner's override wins
    # End to end through the CLI, on a small corpus and vocabulary built in tmp_path.
    rc = main(
        [
            "train",
            "--workspace",
            str(workspace),
            "--seconds",
            "60",
            "--max-steps",
            "12",
            f"data.root={tmp_path / 'data'}",
            "data.num_docs=300",
            "data.num_workers=0",
            "tokenizer.vocab_size=512",
            "tokenizer.num_threads=1",
            "model.vocab_size=512",
            "optim.warmup_steps=2",
            "train.log_every=4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "attention yours" in out and "step   12" in out and "your pieces learn!" in out


def test_train_command_in_chinese_learns_and_writes_the_chinese_stories(workspace, tmp_path, capsys):
    from tinyllama.course.__main__ import _compose_job, main

    job = _compose_job([], lang="zh")
    assert (job.data.source, job.tokenizer.name, job.model.vocab_size) == ("synthetic_zh", "bpe_2k_zh", 2048)
    assert (job.model.hidden_size, job.train.batch_size, job.train.seq_len) == (128, 8, 64)  # as in English
    rc = main(
        [
            "train",
            "--lang",
            "zh",
            "--workspace",
            str(workspace),
            "--seconds",
            "60",
            "--max-steps",
            "12",
            f"data.root={tmp_path / 'data'}",
            "data.num_docs=300",
            "data.num_workers=0",
            "tokenizer.vocab_size=1200",
            "tokenizer.num_threads=1",
            "model.vocab_size=1200",
            "optim.warmup_steps=2",
            "train.log_every=4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "attention yours" in out and "your pieces learn!" in out
    assert (tmp_path / "data" / "tokenizers" / "synthetic_zh-bpe_2k_zh" / "tokenizer.model").is_file()
    sample = next(line for line in out.splitlines() if line.startswith("sample: "))
    assert sample.startswith("sample: '从前，")
    written = sample[len("sample: '从前，") :]
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in written) > 10, sample  # the model writes Chinese
