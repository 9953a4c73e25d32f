"""The final exercise: the learner's RMSNorm, RoPE, attention and MLP inside the real model,
trained on the synthetic stories (English, or Chinese with --lang zh) for about a minute on a CPU.

The model takes replacement classes through `ModelParts` (tinyllama/model/modeling.py), so every
decoder layer is built from the learner's lesson 2-5 files. A piece whose file is missing uses
the reference; a piece whose file fails its check stops the run (a broken norm would only show
up as a loss that refuses to fall, which teaches nothing). When both lessons 3 and 4 are done,
the learner's attention also calls the learner's `apply_rotary_pos_emb`.

The loop is deliberately the textbook one (AdamW, warmup, clip, step) and stops on a time
budget; the full-featured loop (checkpoints, resume, mixed precision, DDP) is
tinyllama/train/loop.py, which `python train.py` runs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

from tinyllama.config import JobConfig
from tinyllama.course.checks import run_check
from tinyllama.course.grading import load_learner_module
from tinyllama.course.lessons import CourseError, get_lesson
from tinyllama.data import BatchLoader, ensure_packed, eval_batches
from tinyllama.generate import generate
from tinyllama.losses import evaluate_loss
from tinyllama.model import LlamaForCausalLM, ModelParts, causal_lm_loss
from tinyllama.tokenizer import ensure_tokenizer
from tinyllama.train.optim import build_optimizer, build_schedule

# ModelParts field -> (lesson, class name in the learner's file).
LEARNER_PIECES = {
    "norm": (2, "RMSNorm"),
    "rotary": (3, "RotaryEmbedding"),
    "attention": (4, "Attention"),
    "mlp": (5, "MLP"),
}


@dataclass
class FinalResult:
    pieces: Dict[str, str]
    """ModelParts field -> "yours (<file>)" or "reference"."""
    steps: int
    losses: List[float] = field(default_factory=list)
    """Training loss of every step."""
    val_before: float = float("nan")
    val_after: float = float("nan")

    @property
    def loss_fell(self) -> bool:
        return self.val_after < self.val_before


def learner_parts(workspace: Path) -> Tuple[ModelParts, Dict[str, str]]:
    """ModelParts with the learner's classes where their lesson file exists and passes its check.

    Raises CourseError naming every lesson file that fails its check.
    """
    modules: Dict[int, ModuleType] = {}
    failing = []
    for lesson_no, _ in LEARNER_PIECES.values():
        lesson = get_lesson(str(lesson_no))
        path = workspace / lesson.stub_name
        if not path.is_file():
            continue
        report = run_check(lesson, path)
        if not report.passed:
            failing.append(
                f"lesson {lesson_no} ({path}): {report.first_failure.name}: {report.first_failure.hint}"
            )
            continue
        modules[lesson_no] = load_learner_module(path)
    if failing:
        raise CourseError(
            "these exercise files do not pass their check yet; fix them (python -m "
            "tinyllama.course check N) or move them out of the workspace to train with "
            "the reference instead:\n  " + "\n  ".join(failing)
        )
    if 3 in modules and 4 in modules:  # the learner's attention rotates with the learner's RoPE
        modules[4].apply_rotary_pos_emb = modules[3].apply_rotary_pos_emb
    classes, described = {}, {}
    for part, (lesson_no, class_name) in LEARNER_PIECES.items():
        if lesson_no in modules:
            classes[part] = getattr(modules[lesson_no], class_name)
            described[part] = f"yours ({workspace / get_lesson(str(lesson_no)).stub_name})"
        else:
            described[part] = "reference"
    return ModelParts(**classes), described


def train_with_learner_pieces(
    job: JobConfig, workspace: Path, seconds: float = 60.0, max_steps: Optional[int] = None, log=print
) -> FinalResult:
    """Train job.model built from the learner's pieces for `seconds` (or `max_steps`) on CPU.

    Uses job.data/job.tokenizer (trained and packed first if missing), job.train.batch_size and
    seq_len, job.optim (lr, warmup, weight decay; the schedule is held constant after warmup,
    since the number of steps depends on the machine) and job.run.seed.
    """
    parts, described = learner_parts(workspace)
    for part, who in described.items():
        log(f"  {part:9s} {who}")
    tokenizer = ensure_tokenizer(job.tokenizer, job.data)
    packed = ensure_packed(job.data, tokenizer)
    torch.manual_seed(job.run.seed)
    model = LlamaForCausalLM(job.model, parts=parts)
    optim_cfg = dataclasses.replace(job.optim, schedule="constant")
    optimizer = build_optimizer(model, optim_cfg, torch.device("cpu"))
    schedule = build_schedule(optimizer, optim_cfg, max_steps or 1)
    loader = BatchLoader(packed, "train", job.train.batch_size, job.train.seq_len, job.run.seed)

    def val_loss() -> float:
        batches = eval_batches(packed, "val", job.train.batch_size, job.train.seq_len, max_batches=4)
        return evaluate_loss(model, batches, "cpu")["loss"]

    result = FinalResult(described, steps=0, val_before=val_loss())
    log(
        f"model: {model.num_parameters():,} parameters; validation loss before training "
        f"{result.val_before:.3f}; training for {seconds:g} s"
    )
    model.train()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and (max_steps is None or result.steps < max_steps):
        x, y = loader.next_batch()
        loss = causal_lm_loss(model(x).logits, y)  # logits (B, T, V), y aligned (B, T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if job.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        result.steps += 1
        if result.steps % job.train.log_every == 0:
            log(f"step {result.steps:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")
    result.val_after = val_loss()
    verdict = "your pieces learn!" if result.loss_fell else "the loss did not fall: look for a bug"
    log(
        f"validation loss {result.val_before:.3f} -> {result.val_after:.3f} after {result.steps} "
        f"steps: {verdict}"
    )
    log(f"sample: {_sample(model, tokenizer, job)!r}")
    return result


def _sample(model: LlamaForCausalLM, tokenizer, job: JobConfig, new_tokens: int = 40) -> str:
    """A short story from the trained model (it uses the learner's attention with the KV cache)."""
    prompt = torch.tensor([tokenizer.encode(job.sample.prompt, bos=True)])
    ids = generate(
        model,
        prompt,
        max_new_tokens=new_tokens,
        temperature=job.sample.temperature,
        top_p=job.sample.top_p,
        seed=job.run.seed,
    )
    return tokenizer.decode(ids[0].tolist())
