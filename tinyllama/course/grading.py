"""How a lesson's answers are graded: load the learner's file, run named cases, explain the first
failure.

A case compares the learner's output with the reference implementation in `tinyllama/model/` on
random inputs. When they differ, `compare` says how, most specific first:

1. a known mistake: the learner's output equals what a typical buggy variant produces (RoPE on
   the wrong half, `repeat` instead of `expand`, no float32 upcast, ...), so we name the bug;
2. the wrong shape or dtype (with the dimension names, e.g. `(B, H, T, D)`);
3. NaN or inf where the reference is finite;
4. wrong values: where they start to differ (`from index 32 of D on`) and by how much.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import torch


class Mismatch(AssertionError):
    """A case failed; the message is the hint shown to the learner."""


@dataclass
class CaseResult:
    name: str
    passed: bool
    hint: str = ""


@dataclass
class Report:
    """Outcome of one `check`: every case, in order."""

    lesson: str
    results: List[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def first_failure(self) -> Optional[CaseResult]:
        return next((r for r in self.results if not r.passed), None)

    def render(self) -> str:
        lines = [f"{'PASS' if r.passed else 'FAIL'}  {r.name}" for r in self.results]
        done = sum(r.passed for r in self.results)
        lines.append(f"{done}/{len(self.results)} cases pass")
        failure = self.first_failure
        if failure is not None:
            lines.append(f"\nfirst failure: {failure.name}\n  hint: {failure.hint}")
        else:
            lines.append("all cases pass: well done!")
        return "\n".join(lines)


def load_learner_module(path: Path) -> ModuleType:
    """Import the learner's file under a private name (a fresh import on every check)."""
    name = f"_course_learner_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise Mismatch(f"cannot import {path}: is it a .py file?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a syntax error or a bad import in the learner's file
        sys.modules.pop(name, None)
        raise Mismatch(f"your file {path} does not import: {_describe(e, path)}") from e
    return module


def learner_attr(module: ModuleType, name: str) -> Callable:
    """The learner's function or class `name`, or a clear failure naming the stub's name."""
    obj = getattr(module, name, None)
    if obj is None:
        raise Mismatch(f"your file has no `{name}`: keep the names and signatures from the stub")
    return obj


class Grader:
    """Runs the cases of one lesson against one learner file and collects a `Report`."""

    def __init__(self, lesson: str, path: Path):
        self.path = path
        self.report = Report(lesson)

    def case(self, name: str, fn: Callable[[], None]) -> bool:
        """Run one case; any exception becomes a failed case with a hint."""
        try:
            fn()
        except Mismatch as e:
            self.report.results.append(CaseResult(name, False, str(e)))
        except NotImplementedError as e:
            frame = _learner_frame(e, self.path)
            where = f"`{frame.name}` (line {frame.lineno}) " if frame else ""
            self.report.results.append(
                CaseResult(
                    name,
                    False,
                    f"not implemented yet: {where}still raises NotImplementedError; replace "
                    f"it with your code in {self.path.name}",
                )
            )
        except Exception as e:  # the learner's code crashed: show where, in their file
            self.report.results.append(CaseResult(name, False, _describe(e, self.path)))
        else:
            self.report.results.append(CaseResult(name, True))
            return True
        return False


def _learner_frame(e: BaseException, path: Path) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the traceback that lies in the learner's file, if any."""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if Path(frame.filename).resolve() == path.resolve():
            return frame
    return None


def _describe(e: BaseException, path: Path) -> str:
    """`TypeError: ... (your file line 12: `return x @ w`)`: the learner's own frame, if any."""
    frame = _learner_frame(e, path)
    where = f" (your file {path.name}, line {frame.lineno}: `{(frame.line or '').strip()}`)" if frame else ""
    return f"{type(e).__name__}: {e}{where}"


def compare(
    got: object,
    expected: torch.Tensor,
    *,
    what: str,
    dims: Sequence[str] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
    mistakes: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    """Raise `Mismatch` with a hint unless `got` matches `expected` (shape, dtype and values).

    what: a name for the tensor in hints ("rotate_half(x)").
    dims: names of the dimensions, e.g. ("B", "H", "T", "D"), used to say where values differ.
    mistakes: {hint: output of a typical buggy variant}; if `got` equals one of them, that hint
        is the message (checked first: it is the most useful thing we can say).
    """
    if not isinstance(got, torch.Tensor):
        raise Mismatch(
            f"{what} returned {type(got).__name__}, expected a torch.Tensor of shape "
            f"{_shape(expected.shape, dims)}"
        )
    for hint, wrong in (mistakes or {}).items():
        if (
            got.shape == wrong.shape
            and not _close(got, expected, atol, rtol)
            and _close(got, wrong, atol, rtol)
        ):
            raise Mismatch(f"{what}: {hint}")
    if got.shape != expected.shape:
        extra = ""
        if got.numel() == expected.numel():
            extra = " (same number of elements: a transpose, view or reshape in the wrong order?)"
        raise Mismatch(
            f"{what} has shape {_shape(got.shape, ())}, expected {_shape(expected.shape, dims)}{extra}"
        )
    if got.dtype != expected.dtype:
        fix = (
            "compute it in float32 (.float()) and return that"
            if expected.dtype == torch.float32
            else f"compute in float32 if needed, then cast back with .to({expected.dtype})"
        )
        raise Mismatch(f"{what} has dtype {got.dtype}, expected {expected.dtype}: {fix}")
    bad_got = ~torch.isfinite(got) & torch.isfinite(expected)
    if bad_got.any():
        where = _position(bad_got, dims)
        raise Mismatch(
            f"{what} has NaN/inf at {where} where the reference is finite "
            f"(a division by zero, or an overflow in half precision?)"
        )
    if not _close(got, expected, atol, rtol):
        raise Mismatch(_value_hint(got, expected, what, dims, atol, rtol))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol, equal_nan=True)


def _value_hint(
    got: torch.Tensor, expected: torch.Tensor, what: str, dims: Sequence[str], atol: float, rtol: float
) -> str:
    g, e = got.detach().float(), expected.detach().float()
    bad = ~torch.isclose(g, e, atol=atol, rtol=rtol, equal_nan=True)
    share = bad.float().mean().item()
    first = _position(bad, dims)
    idx = tuple(int(i) for i in bad.nonzero()[0])
    msg = (
        f"{what} has wrong values at {share:.0%} of positions, first at {first}: got "
        f"{g[idx].item():.4g}, expected {e[idx].item():.4g} "
        f"(max abs error {(g - e).abs().max().item():.3g})"
    )
    if e.dim() >= 1 and e.shape[-1] > 1:
        # Which indices of the last dimension are wrong (any row): e.g. only the second half.
        cols = bad.reshape(-1, e.shape[-1]).any(0).nonzero().flatten().tolist()
        last = dims[-1] if len(dims) == e.dim() else "the last dimension"
        if cols and cols[0] > 0:
            msg += f"; values differ from index {cols[0]} of {last} on"
        elif cols and cols[-1] < e.shape[-1] - 1:
            msg += f"; only indices {cols[0]}..{cols[-1]} of {last} differ"
    if torch.allclose(g, -e, atol=atol, rtol=rtol):
        msg += "; your output is the reference negated: check a sign"
    return msg


def _position(mask: torch.Tensor, dims: Sequence[str]) -> str:
    """First True position of `mask` as `(B=0, T=3, D=32)` (or plain indices without names)."""
    idx = [int(i) for i in mask.nonzero()[0]] if mask.dim() else []
    if len(dims) == len(idx):
        return "(" + ", ".join(f"{d}={i}" for d, i in zip(dims, idx)) + ")"
    return str(tuple(idx))


def _shape(shape: torch.Size, dims: Sequence[str]) -> str:
    s = "(" + ", ".join(str(n) for n in shape) + ")"
    return f"{s} {tuple(dims)}".replace("'", "") if len(dims) == len(shape) else s
