"""Evaluation on conversations: what a chat, DPO or GRPO run is measured by.

    run_chat_evaluation(job, ckpt, model, ...)   the evaluate stage on a run whose data is chat
    assistant_loss(model, tokenizer, convs)      loss on the assistant's tokens only
    answer_accuracy(model, tokenizer, convs)     greedy replies vs the short answers, per kind
    pass_at_k(model, tokenizer, convs, ks)       sampled replies: the chance that one of k is right

The built-in corpus (data=synthetic_chat) has checkable short answers (synthetic_chat.answer_matches)
and names each question's kind; your files have neither, and get the loss only. On a DPO run the
stage also reports preference_accuracy on the held-out pairs (tinyllama/dpo.py).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from tinyllama.chat import greedy_replies, sampled_replies
from tinyllama.chat_template import encode_conversation
from tinyllama.config import DataConfig
from tinyllama.data.conversations import iter_conversations
from tinyllama.data.preferences import preference_pairs
from tinyllama.data.sft_batches import PackingStats, collate, pack_windows, padding_id
from tinyllama.data.synthetic_chat import answer_matches
from tinyllama.dpo import load_reference, preference_accuracy
from tinyllama.errors import DataError
from tinyllama.losses import evaluate_loss


def run_chat_evaluation(job, ckpt, model, tokenizer, data: DataConfig, seq_len: int) -> Dict[str, object]:
    """The evaluation stage on conversations: the loss on assistant tokens of `data`'s
    evaluate.split and, for the built-in corpus, answer_accuracy (overall and per kind of
    question) over up to evaluate.max_answers of its questions and pass@k for k in
    evaluate.pass_at, sampled at the run's temperature; printed and written to
    <run>/eval/<name>.json. Returns the results."""
    ev = job.evaluate
    conversations = list(iter_conversations(data, ev.split))
    loss = assistant_loss(model, tokenizer, conversations, ev.batch_size, seq_len, ev.max_batches)
    result: Dict[str, object] = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "source": f"{data.name}/{ev.split}",
        "seq_len": seq_len,
        "conversations": len(conversations),
        **loss,
    }
    lines = []
    answered = any(c.get("answer") is not None for c in conversations)
    if data.source == "synthetic_chat" and not answered:  # a tiny corpus's held-out split can be drills only
        lines.append(
            f"answer_accuracy: none of the {len(conversations)} conversations ends with a short answer"
        )
    elif data.source == "synthetic_chat":  # only the built-in corpus has checkable short answers
        weights = job.sample.weights
        result.update(
            answer_accuracy(model, tokenizer, conversations, ev.max_answers, ev.batch_size, weights=weights)
        )
        result["decode_weights"] = weights
        lines.append(f"answer_accuracy {result['answer_accuracy']:.3f} ({result['answer_count']} questions)")
        by_kind = result["answer_accuracy_by_question"]
        lines.append("  by question: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()))
        if ev.pass_at:
            temperature = run_temperature(ckpt.job) if ev.temperature is None else ev.temperature
            passes = pass_at_k(
                model,
                tokenizer,
                conversations,
                ev.pass_at,
                temperature,
                ev.max_answers,
                ev.batch_size,
                weights=weights,
            )
            result.update(passes)
            lines.append(
                ", ".join(f"pass@{k} {passes[f'pass@{k}']:.3f}" for k in ev.pass_at)
                + f" (temperature {temperature:g})"
            )
    if ckpt.job.train.objective == "dpo":
        result.update(held_out_preferences(ckpt, model, tokenizer, ev.batch_size))
        lines.append(f"preference_accuracy {result['preference_accuracy']:.3f}")
        if "preference_accuracy_by_question" in result:
            by_kind = result["preference_accuracy_by_question"]
            lines.append("  by question: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()))
    name = f"step_{ckpt.step}-{data.name}_{ev.split}-chat"
    out = ckpt.path.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"{result['source']} ({len(conversations)} conversations, {loss['assistant_tokens']} assistant "
        f"tokens): assistant_loss {loss['assistant_loss']:.4f}\n"
        + "".join(f"{line}\n" for line in lines)
        + f"written {out / name}.json"
    )
    return result


def held_out_preferences(ckpt, model: nn.Module, tokenizer, batch_size: int = 8) -> Dict[str, float]:
    """preference_accuracy (tinyllama.dpo) of a DPO run on its held-out pairs, relative to the
    weights it started from (its init_from)."""
    run = ckpt.job
    pairs = preference_pairs(run.dpo, run.data, "val")
    reference = load_reference(run.init_from, next(model.parameters()).device)
    return preference_accuracy(model.eval(), reference, tokenizer, pairs, batch_size)


def run_temperature(job) -> float:
    """The temperature a run samples at: its rollouts' for a GRPO run, else its samples'."""
    if job.train.objective == "grpo":
        return job.grpo.temperature
    return job.sample.temperature


def assistant_loss(
    model: nn.Module,
    tokenizer,
    conversations: Iterable[Dict[str, object]],
    batch_size: int = 8,
    seq_len: Optional[int] = None,
    max_batches: Optional[int] = None,
) -> Dict[str, object]:
    """Mean loss per assistant token (the tokens fine-tuning trains on: the replies and their
    end-of-turn) over `conversations` ({"messages": [...]} records), packed into windows of
    seq_len tokens (default: the model's context) exactly as fine-tuning packs them (a
    conversation's logits in a window equal its own). Conversations longer than a window are cut
    (or dropped when nothing that carries loss is left), and counted.
    Returns dict(assistant_loss, assistant_tokens, truncated, dropped)."""
    device = next(model.parameters()).device
    stats = PackingStats()
    encoded = (encode_conversation(tokenizer, c["messages"], train_on="assistant") for c in conversations)
    windows = pack_windows(
        encoded, seq_len or model.config.max_position_embeddings, padding_id(tokenizer), "truncate", stats
    )

    def batches() -> Iterator[Dict[str, torch.Tensor]]:
        chunks = iter(lambda: list(itertools.islice(windows, batch_size)), [])
        for b, chunk in enumerate(chunks):
            if max_batches is not None and b >= max_batches:
                return
            yield collate(chunk).inputs().inputs

    result = evaluate_loss(model, batches(), device)
    return {
        "assistant_loss": result["loss"],
        "assistant_tokens": result["tokens"],
        "truncated": stats.truncated,
        "dropped": stats.dropped,
    }


def _questions(conversations: Iterable[Dict[str, object]], max_answers: Optional[int]) -> List[Dict]:
    """The conversations with a short answer (the first max_answers; None: all), checked to end
    with the assistant turn that holds it."""
    asked = [c for c in conversations if c.get("answer") is not None]
    asked = asked[:max_answers] if max_answers is not None else asked
    if not asked:
        raise DataError("answer_accuracy: none of the conversations has a short answer to check")
    for c in asked:
        if c["messages"][-1]["role"] != "assistant":
            raise DataError(
                f"a conversation with an answer must end with its assistant turn: {c['messages'][-1]}"
            )
    return asked


def _limits(tokenizer, asked: Sequence[Dict]) -> List[int]:
    """Tokens each reply may take: a few more than its answer needs (a longer one cannot match)."""
    return [len(tokenizer.encode(c["answer"])) + 4 for c in asked]  # + end-of-turn and slack


def answer_accuracy(
    model: nn.Module,
    tokenizer,
    conversations: Iterable[Dict[str, object]],
    max_answers: Optional[int] = None,
    batch_size: int = 8,
    examples: int = 5,
    weights: str = "float32",
) -> Dict[str, object]:
    """Share of questions answered exactly: for each conversation with an "answer" (the built-in
    corpus's short reply to its last user turn; the first max_answers of them, None: all), the
    greedy reply to the messages before its last assistant turn, compared by `answer_matches`.

    Returns dict(answer_accuracy, answer_count, answer_accuracy_by_question and
    answer_count_by_question (per kind of question, the conversations' "question"; "other" where
    it is not given), answer_examples: the first `examples` {"answer", "reply"} pairs). Usable on
    any model whose tokenizer has the chat pieces (a base run too, to compare it with its
    fine-tuned run on the same questions)."""
    asked = _questions(conversations, max_answers)
    replies = greedy_replies(
        model, tokenizer, [c["messages"][:-1] for c in asked], _limits(tokenizer, asked), batch_size, weights
    )
    right = [answer_matches(r, c["answer"]) for r, c in zip(replies, asked)]
    total, correct = collections.Counter(), collections.Counter()
    for c, ok in zip(asked, right):
        kind = c.get("question") or "other"
        total[kind] += 1
        correct[kind] += ok
    return {
        "answer_accuracy": sum(right) / len(asked),
        "answer_count": len(asked),
        "answer_accuracy_by_question": {k: correct[k] / n for k, n in sorted(total.items())},
        "answer_count_by_question": dict(sorted(total.items())),
        "answer_examples": [{"answer": c["answer"], "reply": r} for c, r in zip(asked[:examples], replies)],
    }


def pass_at_k(
    model: nn.Module,
    tokenizer,
    conversations: Iterable[Dict[str, object]],
    ks: Sequence[int] = (1, 4),
    temperature: float = 1.0,
    max_answers: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    weights: str = "float32",
) -> Dict[str, float]:
    """pass@k for each k in ks: n = max(ks) replies sampled per question at `temperature`, and
    for each question the unbiased estimate 1 - C(n - c, k) / C(n, k) (c of the n correct) of
    the chance that at least one of k samples is right, averaged over the questions.
    Returns {"pass@k": ..., "pass_samples": n}."""
    asked = _questions(conversations, max_answers)
    n = max(ks)
    prompts = [c["messages"][:-1] for c in asked for _ in range(n)]  # a question's samples adjacent
    limits = [limit for limit in _limits(tokenizer, asked) for _ in range(n)]
    replies = sampled_replies(
        model, tokenizer, prompts, limits, batch_size * n, temperature, seed=seed, weights=weights
    )
    counts = [
        sum(answer_matches(r, c["answer"]) for r in replies[i * n : (i + 1) * n]) for i, c in enumerate(asked)
    ]
    out: Dict[str, float] = {}
    for k in ks:
        estimates = [1.0 - math.comb(n - c, k) / math.comb(n, k) for c in counts]
        out[f"pass@{k}"] = sum(estimates) / len(estimates)
    out["pass_samples"] = n
    return out
