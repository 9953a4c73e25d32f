"""Lesson 5 check: the SwiGLU MLP against tinyllama/model/mlp.py."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.model import MLP, LlamaConfig


def _config(hidden: int, intermediate: int, bias: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        mlp_bias=bias,
    )


def _run(learner: ModuleType, hidden: int, intermediate: int, bias: bool, seed: int) -> None:
    config = _config(hidden, intermediate, bias)
    torch.manual_seed(seed)
    ref = MLP(config)
    mine = learner_attr(learner, "MLP")(config)
    ref_keys = sorted(ref.state_dict())
    got_keys = sorted(mine.state_dict())
    if got_keys != ref_keys:
        raise Mismatch(
            f"your MLP's parameters are {got_keys}, expected {ref_keys}: three nn.Linear "
            f"named gate_proj, up_proj, down_proj (bias=config.mlp_bias)"
        )
    try:
        mine.load_state_dict(ref.state_dict())
    except RuntimeError as e:
        raise Mismatch(
            f"wrong projection shapes: gate_proj and up_proj map C={hidden} -> "
            f"I={intermediate}, down_proj maps I -> C ({str(e).splitlines()[-1].strip()})"
        ) from e
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, got = ref(x), mine(x)
        gate, up, down = ref.gate_proj(x), ref.up_proj(x), ref.down_proj
        mistakes = {
            "silu is applied to up_proj(x): it belongs on the gate, down(silu(gate(x)) * up(x))": down(
                gate * F.silu(up)
            ),
            "silu is applied after the product: it goes on the gate only, down(silu(gate(x)) * up(x))": down(
                F.silu(gate * up)
            ),
            "no activation: SwiGLU needs silu on the gate branch": down(gate * up),
            "matches down(silu(gate(x))) + ...: the two branches are multiplied, not added": down(
                F.silu(gate) + up
            ),
        }
    compare(
        got,
        expected,
        what=f"MLP output (C={hidden}, I={intermediate})",
        dims=("B", "T", "C"),
        mistakes=mistakes,
    )


def check(grader: Grader, learner: ModuleType) -> None:
    for seed, (hidden, inter, bias) in enumerate([(16, 40, False), (32, 88, False), (8, 24, True)]):
        grader.case(
            f"C={hidden} I={inter} bias={bias} seed {seed}",
            lambda h=hidden, i=inter, b=bias, s=seed: _run(learner, h, i, b, s),
        )
