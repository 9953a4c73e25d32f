"""AdamW parameter groups and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllama.config import OptimConfig
from tinyllama.model import LlamaConfig, LlamaForCausalLM
from tinyllama.train.optim import build_optimizer, build_schedule, lr_multiplier, param_groups


def _model(tie: bool, bias: bool = False) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=tie,
            attention_bias=bias,
        )
    )


@pytest.mark.parametrize("tie", [True, False])
def test_decay_only_on_linear_matrices(tie):
    model = _model(tie, bias=True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in kept
    assert all(n.endswith("proj.weight") or n == "lm_head.weight" for n in decayed)
    assert all("norm" in n or n.endswith(".bias") or "embed" in n for n in kept)
    assert any(n.endswith("q_proj.bias") for n in kept)
    # every trainable parameter exactly once (a tied head is the embedding tensor)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert ("lm_head.weight" in decayed) == (not tie)


def test_optimizer_is_adamw_with_groups():
    opt = build_optimizer(_model(True), OptimConfig(lr=3e-3, beta2=0.99), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["lr"] == 3e-3


def _curve(cfg: OptimConfig, steps: int):
    return [lr_multiplier(s, cfg, steps) for s in range(steps)]


def test_warmup_is_linear_and_never_zero():
    for schedule in ("cosine", "wsd", "constant"):
        c = _curve(OptimConfig(schedule=schedule, warmup_steps=4), 100)
        assert c[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, c[4]]) and c[4] <= 1.0


def test_cosine_reaches_min_ratio_at_the_end():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    c = _curve(cfg, 110)
    assert c[10] == pytest.approx(1.0)
    assert c[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(c[10:], c[11:]))  # monotone after warmup


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    cfg = OptimConfig(schedule="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    c = _curve(cfg, 100)
    assert c[10:80] == [1.0] * 70
    assert c[90] == pytest.approx(0.5) and lr_multiplier(100, cfg, 100) == pytest.approx(0.0)


def test_constant_after_warmup():
    assert _curve(OptimConfig(schedule="constant", warmup_steps=2), 50)[2:] == [1.0] * 48


def test_schedule_resumes_from_its_state_dict():
    cfg = OptimConfig(schedule="cosine", warmup_steps=3, lr=1e-2)

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
        return opt, build_schedule(opt, cfg, 20)

    opt, sched = make()
    straight = []
    for _ in range(20):
        straight.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    opt, sched = make()
    for _ in range(8):
        opt.step(), sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())  # holds the current lr; the schedule its step count
    sched2.load_state_dict(sched.state_dict())
    resumed = []
    for _ in range(12):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step(), sched2.step()
    assert resumed == straight[8:]
    assert straight[0] == pytest.approx(cfg.lr / 3) and math.isclose(max(straight), cfg.lr)
