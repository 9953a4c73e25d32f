"""Lesson 2 check: RMSNorm against tinyllama/model/norm.py."""

from __future__ import annotations

from types import ModuleType

import torch

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.model import RMSNorm

DIMS = ("B", "T", "C")
# (atol, rtol) per dtype: one rounding of the output in that dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _pair(learner: ModuleType, hidden: int, eps: float, dtype: torch.dtype, seed: int):
    """The reference and the learner's RMSNorm with the same random gain, cast to dtype."""
    torch.manual_seed(seed)
    ref = RMSNorm(hidden, eps=eps)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.5)
    mine = learner_attr(learner, "RMSNorm")(hidden, eps=eps)
    try:
        mine.load_state_dict(ref.state_dict())
    except (RuntimeError, AttributeError) as e:
        raise Mismatch(
            f"cannot load the reference weights into your RMSNorm: keep one parameter "
            f"named `weight` of shape ({hidden},) ({str(e).splitlines()[0]})"
        ) from e
    return ref.to(dtype), mine.to(dtype)


def _without_upcast(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The classic mistake: the statistics computed in the input's (half) dtype."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _run(
    learner: ModuleType,
    shape,
    dtype: torch.dtype,
    seed: int,
    scale: float = 1.0,
    zero_row: bool = False,
    eps: float = 1e-5,
) -> None:
    ref, mine = _pair(learner, shape[-1], eps, dtype, seed)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    if zero_row:
        x[0, 1] = 0.0
    expected = ref(x)
    with torch.no_grad():
        got = mine(x)
    mistakes = {}
    if dtype != torch.float32:
        mistakes[
            f"matches RMSNorm computed in {dtype}: upcast with x.to(torch.float32) before "
            "squaring (fp16 squares of values above 256 overflow to inf) and cast back at the "
            "end"
        ] = _without_upcast(x, ref.weight, eps)
    if zero_row:
        mistakes[
            "an all-zero token came out NaN (0 / 0): add eps inside the square root, rsqrt(mean(x^2) + eps)"
        ] = ref.weight * (x.float() / x.float().pow(2).mean(-1, keepdim=True).sqrt()).to(dtype)
    atol, rtol = TOLERANCE[dtype]
    compare(
        got,
        expected.detach(),
        what=f"RMSNorm output for {dtype} input {tuple(shape)}",
        dims=DIMS,
        atol=atol,
        rtol=rtol,
        mistakes=mistakes,
    )


def _default_init(learner: ModuleType) -> None:
    mine = learner_attr(learner, "RMSNorm")(16, eps=1e-6)
    weight = getattr(mine, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        raise Mismatch(
            "RMSNorm needs `self.weight = nn.Parameter(torch.ones(hidden_size))`: a "
            "Parameter, so the optimizer trains it"
        )
    compare(weight.detach(), torch.ones(16), what="the initial weight", dims=("C",))


def check(grader: Grader, learner: ModuleType) -> None:
    grader.case("weight is a Parameter of ones", lambda: _default_init(learner))
    for seed, shape in enumerate([(2, 5, 16), (3, 7, 64), (1, 1, 8)]):
        grader.case(
            f"float32 {shape} seed {seed}", lambda s=shape, seed=seed: _run(learner, s, torch.float32, seed)
        )
    grader.case(
        "eps: an all-zero token stays finite",
        lambda: _run(learner, (2, 3, 32), torch.float32, 3, zero_row=True),
    )
    grader.case("bfloat16 input keeps its dtype", lambda: _run(learner, (2, 4, 32), torch.bfloat16, 4))
    grader.case(
        "float16 input with large activations (~300)",
        lambda: _run(learner, (2, 4, 64), torch.float16, 5, scale=300.0),
    )
