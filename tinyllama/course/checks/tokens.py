"""Lesson 1 check: ids and pieces against the Tokenizer (tinyllama/tokenizer.py), the embedding
lookup against LlamaModel.embed_tokens and the tied head against LlamaForCausalLM.lm_head."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import ModuleType

import torch

from tinyllama.config import DataConfig, TokenizerConfig
from tinyllama.course.grading import CaseResult, Grader, Mismatch, compare, learner_attr
from tinyllama.data.synthetic import iter_stories
from tinyllama.model import LlamaConfig, LlamaForCausalLM
from tinyllama.tokenizer import ensure_tokenizer

TEXTS = [
    "Once upon a time, there was a little fox named Pip.",
    'Mia said, "Look at the 42 red balloons!"\nThe end.',
    "ünïcödé and emoji 🦊",
]


def _tokenizer(folder: Path):
    """A small BPE tokenizer trained on 300 synthetic stories (about a second)."""
    return ensure_tokenizer(
        TokenizerConfig(name="course", vocab_size=400, num_threads=1),
        DataConfig(num_docs=300, root=str(folder)),
    )


def _case_pieces(learner: ModuleType, tokenizer) -> None:
    fn = learner_attr(learner, "ids_and_pieces")
    for text in TEXTS:
        got = fn(tokenizer, text)
        ids = tokenizer.encode(text)
        expected = [(i, tokenizer.sp.id_to_piece(i)) for i in ids]
        if not isinstance(got, list) or [tuple(p) for p in got] != expected:
            if isinstance(got, list) and len(got) == len(ids) + 1:
                raise Mismatch(f"ids_and_pieces({text!r}) has one pair too many: encode without BOS/EOS")
            raise Mismatch(f"ids_and_pieces({text!r}) = {got!r:.200}, expected {expected!r:.200}")


def _case_bytes(learner: ModuleType, tokenizer) -> None:
    texts = list(iter_stories(5, seed=7)) + TEXTS  # with non-ASCII text: bytes are not characters
    got = learner_attr(learner, "bytes_per_token")(tokenizer, texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    expected = n_bytes / n_tokens
    if not isinstance(got, (float, int)) or abs(got - expected) > 1e-6 * expected:
        chars = sum(len(t) for t in texts) / n_tokens
        hint = (
            " (that is characters per token: count UTF-8 bytes, len(text.encode('utf-8')))"
            if isinstance(got, (float, int)) and abs(got - chars) < 1e-6 * chars
            else ""
        )
        raise Mismatch(
            f"bytes_per_token = {got!r}, expected {expected:.4f} ({n_bytes} bytes / {n_tokens} tokens){hint}"
        )


def _case_embed(learner: ModuleType, seed: int) -> None:
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=12,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(seed))
    weight = model.model.embed_tokens.weight.detach()
    got = learner_attr(learner, "embed")(ids, weight)
    compare(
        got,
        model.model.embed_tokens(ids).detach(),
        what="embed(input_ids (2, 7), weight (50, 12))",
        dims=("B", "T", "C"),
    )
    hidden = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(seed + 1))
    logits = learner_attr(learner, "tied_logits")(hidden, weight)
    compare(
        logits,
        model.lm_head(hidden).detach(),
        what="tied_logits(hidden (2, 7, 12), weight (50, 12))",
        dims=("B", "T", "V"),
    )


def check(grader: Grader, learner: ModuleType) -> None:
    with tempfile.TemporaryDirectory(prefix="course_lesson1_") as folder:
        try:
            tokenizer = _tokenizer(Path(folder))
        except Exception as e:  # not the learner's fault: say so rather than blame their code
            grader.report.results.append(
                CaseResult(
                    "set-up: train a small tokenizer",
                    False,
                    f"could not train the practice tokenizer ({type(e).__name__}: {e}); is sentencepiece installed?",
                )
            )
            return
        grader.case("ids_and_pieces", lambda: _case_pieces(learner, tokenizer))
        grader.case("bytes_per_token", lambda: _case_bytes(learner, tokenizer))
    for seed in range(2):
        grader.case(f"embed and tied_logits seed {seed}", lambda s=seed: _case_embed(learner, s))
