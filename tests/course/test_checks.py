"""Every lesson's check: the reference solution passes, the untouched stub fails with a clear
message, and planted bugs fail with the hint that names them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinyllama.course.checks import run_check
from tinyllama.course.lessons import LESSONS, get_lesson

SOLUTIONS = Path(__file__).resolve().parent / "solutions"

# (lesson, text in the solution, replacement, words the first failure's hint must contain)
PLANTED_BUGS = [
    (1, 'len(t.encode("utf-8"))', "len(t)", "characters per token"),
    (1, "return weight[input_ids]", "return weight[input_ids] * 2", "wrong values at 100% of positions"),
    (2, "x = hidden_states.to(torch.float32)", "x = hidden_states", "upcast with x.to(torch.float32)"),
    (2, " + self.eps)", ")", "add eps inside the square root"),
    (
        2,
        "return self.weight * x.to(dtype)",
        "return self.weight * x",
        "dtype torch.float32, expected torch.bfloat16",
    ),
    (3, "torch.cat((-x2, x1), dim=-1)", "torch.cat((-x1, x2), dim=-1)", "you rotated the wrong half"),
    (
        3,
        "torch.cat((-x2, x1), dim=-1)",
        "torch.cat((-x2, -x1), dim=-1)",
        "values differ from index 4 of D on: only the second half is wrong, did you rotate the wrong half",
    ),
    (3, "torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)", "the minus sign goes on x2"),
    (3, " ** (head_dim / (head_dim - 2))", "", "you left out the exponent D / (D - 2)"),
    (3, 'inv_freq / rope_scaling["factor"]', 'inv_freq * rope_scaling["factor"]', "you multiplied"),
    (
        4,
        "hidden_states[:, :, None].expand(b, kv, n_rep, s, d)",
        "hidden_states[:, None].expand(b, n_rep, kv, s, d)",
        "wrong group order: query head h must read key/value head h // n_rep",
    ),
    (4, ".tril(past)", ".tril(past - 1)", "the diagonal is blocked"),
    (4, ".tril(past)", ".tril()", "the cached positions are ignored"),
    (
        4,
        "F.softmax(scores, dim=-1, dtype=torch.float32)",
        "(scores.exp() / scores.exp().sum(-1, keepdim=True))",
        "overflows for large scores",
    ),
    (
        4,
        "scores = query @ key.transpose(-1, -2) * scaling",
        "scores = query @ key.transpose(-1, -2)",
        "scores are not scaled",
    ),
    (4, "k, v = past_key_values.update(k, v, self.layer_idx)", "pass", "decode step with a KV cache"),
    (
        5,
        "F.silu(self.gate_proj(x)) * self.up_proj(x)",
        "self.gate_proj(x) * F.silu(self.up_proj(x))",
        "silu is applied to up_proj(x)",
    ),
    (
        6,
        "return h + self.mlp(self.post_attention_layernorm(h))",
        "return h + self.mlp(self.input_layernorm(h))",
        "input_layernorm is used twice",
    ),
    (6, "attn = 2 * c * h * d + 2 * c * kv * d", "attn = 4 * c * h * d", "k_proj and v_proj C*KV*D"),
    (
        6,
        'with torch.device("meta"):\n        return',
        "if True:\n        return",
        "with torch.device('meta')",
    ),
    (
        7,
        "out = model(next_id, past_key_values=out.past_key_values, use_cache=True)",
        "out = model(input_ids)",
        "feed only the newest token",
    ),
    (
        3,
        "emb.cos().to(x.dtype), emb.sin().to(x.dtype)",
        "emb.to(x.dtype).cos(), emb.to(x.dtype).sin()",
        "so the angles were computed in torch.bfloat16",
    ),
    (7, "out = model(input_ids, use_cache=True)", "out = model(input_ids)", "fed one token without a cache"),
    (
        7,
        "config.resolved_num_key_value_heads * seq_len",
        "config.num_attention_heads * seq_len",
        "the cache stores only the KV=2 heads",
    ),
    (7, "probs.cumsum(-1) - probs >= p", "probs.cumsum(-1) > p", "crosses p; it stays"),
    (8, "targets[:, :-1] = labels[:, 1:]", "targets[:, 1:] = labels[:, :-1]", "shifted the wrong way"),
    (8, "    optimizer.zero_grad(set_to_none=True)\n", "", "call optimizer.zero_grad() every step"),
    (8, "logits.float().flatten(0, 1)", "logits.flatten(0, 1)", "expected torch.float32"),
    (
        9,
        'if message["role"] == "assistant":',
        'if message["role"] != "system":',
        "system/user tokens carry loss",
    ),
    (9, "labels += [IGNORE_INDEX] + body", "labels += [role] + body", "the <|assistant|> piece is labelled"),
    (9, "[IGNORE_INDEX] + body\n", "[IGNORE_INDEX] + body[:-1] + [IGNORE_INDEX]\n", "never learns to stop"),
    (9, "same & causal & real", "causal & real", "attend to the conversations packed before them"),
    (9, "same & causal & real", "same & real", "the mask must stay causal"),
    (9, " | torch.eye(t, dtype=torch.bool))", ")", "let a padding token see itself"),
    (10, "F.logsigmoid(z) - label", "torch.log(torch.sigmoid(z)) - label", "use F.logsigmoid"),
    (10, "z = beta * (chosen - rejected)", "z = chosen - rejected", "beta is missing"),
    (
        10,
        "z = beta * (chosen - rejected)",
        "z = beta * (policy_chosen_logps - policy_rejected_logps)",
        "the reference is left out",
    ),
    (10, "-(1 - label_smoothing) * F.logsigmoid(z)", "-F.logsigmoid(-z)", "chosen and rejected are swapped"),
    (10, "beta * chosen.detach()", "beta * chosen", "detach it"),
    (10, "h = chosen / chosen_tokens - rejected / rejected_tokens", "h = chosen - rejected", "per token"),
    (10, "grouped.std(dim=1)", "grouped.std(dim=1, unbiased=False)", "the std is the biased one"),
    (10, "advantages / (std + 1e-4)", "advantages / std", "add 1e-4 to the std"),
    (10, "grouped.mean(dim=1, keepdim=True)", "rewards.mean()", "its own group's mean"),
    (10, "is_end.cumsum(dim=1) - is_end == 0", "is_end.cumsum(dim=1) == 0", "is left out"),
    (10, "per_token = -torch.min(", "per_token = -torch.max(", "max instead of min"),
    (10, "torch.clamp(ratio, 1 - epsilon, 1 + high) * A", "ratio * A", "the ratio is not clipped"),
    (
        10,
        "high = epsilon if epsilon_high is None else epsilon_high",
        "high = epsilon",
        "epsilon_high is ignored",
    ),
    (10, "per_token = per_token + beta * ", "per_token = per_token + 0 * ", "the KL term is missing"),
    (
        10,
        "((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()",
        "per_token.mean()",
        "multiply by the mask",
    ),
    (
        10,
        "(per_token * mask).sum() / mask.sum().clamp(min=1)",
        "((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()",
        "that is the 'grpo' aggregation, not 'dapo'",
    ),
]


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda l: l.slug)
def test_reference_solution_passes(lesson):
    report = run_check(lesson, SOLUTIONS / lesson.stub_name)
    assert report.passed, report.render()
    assert len(report.results) >= 3  # several seeds / shapes / dtypes per lesson


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda l: l.slug)
def test_untouched_stub_fails_with_not_implemented(lesson):
    report = run_check(lesson, lesson.stub_path)
    assert not report.passed
    assert not any(r.passed for r in report.results), report.render()
    assert "not implemented yet" in report.first_failure.hint
    assert lesson.stub_name in report.first_failure.hint  # names the file to edit


@pytest.mark.parametrize(
    "lesson_no, old, new, hint", PLANTED_BUGS, ids=[f"{b[0]}-{i}" for i, b in enumerate(PLANTED_BUGS)]
)
def test_planted_bug_fails_with_hint(tmp_path, lesson_no, old, new, hint):
    lesson = get_lesson(str(lesson_no))
    source = (SOLUTIONS / lesson.stub_name).read_text()
    assert source.count(old) == 1, f"the planted bug must change exactly one spot: {old!r}"
    path = tmp_path / lesson.stub_name
    path.write_text(source.replace(old, new))
    report = run_check(lesson, path)
    assert not report.passed
    assert hint in report.first_failure.hint, report.render()


def test_broken_learner_file_is_reported_not_raised(tmp_path):
    path = tmp_path / "lesson2_rmsnorm.py"
    path.write_text("import torch\nclass RMSNorm(torch.nn.Module):\n    def __init__(self, n, eps=1e-6)\n")
    report = run_check(get_lesson("2"), path)
    assert not report.passed
    assert "does not import" in report.first_failure.hint and "SyntaxError" in report.first_failure.hint


def test_crash_in_learner_code_points_at_their_line(tmp_path):
    source = (SOLUTIONS / "lesson5_mlp.py").read_text()
    path = tmp_path / "lesson5_mlp.py"
    path.write_text(
        source.replace("F.silu(self.gate_proj(x)) * self.up_proj(x)", "self.gate_proj(x) @ self.up_proj(x)")
    )
    hint = run_check(get_lesson("5"), path).first_failure.hint
    assert hint.startswith("RuntimeError") and "your file lesson5_mlp.py, line" in hint


def test_missing_name_is_named(tmp_path):
    path = tmp_path / "lesson3_rope.py"
    path.write_text(
        (SOLUTIONS / "lesson3_rope.py").read_text().replace("def rotate_half", "def rotate_halves")
    )
    hint = run_check(get_lesson("3"), path).first_failure.hint
    assert "no `rotate_half`" in hint
