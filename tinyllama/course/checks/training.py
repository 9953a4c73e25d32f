"""Lesson 8 check: the loss against tinyllama/model/heads.py (causal_lm_loss and the labels= path)
and one optimizer step against the textbook step."""

from __future__ import annotations

import copy
from types import ModuleType

import torch
import torch.nn.functional as F

from tinyllama.course.grading import Grader, Mismatch, compare, learner_attr
from tinyllama.model import LlamaConfig, LlamaForCausalLM, causal_lm_loss


def _case_loss(learner: ModuleType, dtype: torch.dtype, seed: int, ignored: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 6, 11, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, 11, (2, 6), generator=gen)
    if ignored:
        targets[0, :3] = -100
        targets[1, -1] = -100
    got = learner_attr(learner, "causal_lm_loss")(logits, targets)
    expected = causal_lm_loss(logits, targets)
    mistakes = {}
    if ignored:
        kept = targets.clamp(min=0)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), kept.flatten(), reduction="none")
        mask = (targets != -100).flatten().float()
        mistakes[
            "the mean runs over ignored positions too: divide by the number of targets that are "
            "not ignore_index (F.cross_entropy(..., ignore_index=-100) does it)"
        ] = (per_token * mask).mean()
        mistakes["ignored positions are counted as class 0: pass ignore_index to the loss"] = per_token.mean()
    compare(
        got,
        expected,
        what=f"causal_lm_loss ({dtype} logits{', with ignored targets' if ignored else ''})",
        atol=1e-5,
        rtol=1e-5,
        mistakes=mistakes,
    )


def _case_shift(learner: ModuleType, seed: int) -> None:
    labels = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(seed))
    labels[1, 0] = -100
    got = learner_attr(learner, "shift_labels")(labels.clone())
    expected = torch.full_like(labels, -100)
    expected[:, :-1] = labels[:, 1:]
    wrong = torch.full_like(labels, -100)
    wrong[:, 1:] = labels[:, :-1]
    compare(
        got,
        expected,
        what="shift_labels(labels (2, 7))",
        dims=("B", "T"),
        atol=0,
        rtol=0,
        mistakes={
            "shifted the wrong way: the target of position t is the NEXT label, "
            "targets[:, t] = labels[:, t + 1]": wrong
        },
    )
    # The same targets must reproduce the model's own labels= loss.
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    ids = labels.clamp(min=0)
    with torch.no_grad():
        out = model(ids, labels=labels)
        compare(
            causal_lm_loss(out.logits, got),
            out.loss,
            what="causal_lm_loss(logits, shift_labels(labels)) vs model(ids, labels=labels).loss",
        )


def _reference_step(model, optimizer, x, y) -> float:
    optimizer.zero_grad()
    loss = causal_lm_loss(model(x).logits, y)
    loss.backward()
    optimizer.step()
    return loss.item()


def _case_train_step(learner: ModuleType, seed: int) -> None:
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(seed)
    models = [LlamaForCausalLM(config)]
    models += [copy.deepcopy(models[0]) for _ in range(2)]
    optims = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 40, (2, 9), generator=gen) for _ in range(3)]
    step = learner_attr(learner, "train_step")
    for i, batch in enumerate(batches):
        x, y = batch[:, :-1], batch[:, 1:]
        got = step(models[0], optims[0], x, y)
        expected = _reference_step(models[1], optims[1], x, y)
        # The classic bug, for the hint: gradients never cleared, so they pile up step after step.
        loss = causal_lm_loss(models[2](x).logits, y)
        loss.backward()
        optims[2].step()
        if not isinstance(got, float):
            raise Mismatch(f"train_step returned {type(got).__name__}: return loss.item(), a Python float")
        if abs(got - expected) > 1e-4 * max(1.0, abs(expected)):
            leaked = all(
                torch.allclose(a, b, atol=1e-6)
                for a, b in zip(models[0].parameters(), models[2].parameters())
            )
            hint = (
                "gradients pile up from step to step: call optimizer.zero_grad() every step"
                if leaked
                else "forward, causal_lm_loss(logits, y), backward, optimizer.step()"
            )
            raise Mismatch(f"step {i}: loss {got:.5f}, expected {expected:.5f}: {hint}")
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        compare(a.detach(), b.detach(), what=f"parameter {name} after 3 steps", atol=1e-5, rtol=1e-4)


def check(grader: Grader, learner: ModuleType) -> None:
    grader.case("causal_lm_loss float32", lambda: _case_loss(learner, torch.float32, 0, False))
    grader.case("causal_lm_loss with ignored targets", lambda: _case_loss(learner, torch.float32, 1, True))
    grader.case(
        "causal_lm_loss bfloat16 logits -> float32 loss", lambda: _case_loss(learner, torch.bfloat16, 2, True)
    )
    grader.case("shift_labels", lambda: _case_shift(learner, 3))
    grader.case("train_step: 3 AdamW steps", lambda: _case_train_step(learner, 4))
