"""The sample stage: it streams what generate() produces, reads prompts from the shorthand and
stdin, refuses or trims prompts longer than the context, and never prints half a character."""

from __future__ import annotations

import io

import pytest
import torch

from tinyllama.errors import ConfigError
from tinyllama.generate import generate
from tinyllama.sample import TextStream, fit_prompt, run_sampling
from tinyllama.tokenizer import ensure_tokenizer


def test_sample_stage_streams_what_generate_produces(saved_run):
    job, model, tok = saved_run
    job.sample.num_samples, job.sample.max_new_tokens, job.sample.seed = 2, 12, 5
    out = io.StringIO()
    texts = run_sampling(job, prompts=["Once upon a time"], out=out)
    ids = torch.tensor([tok.encode("Once upon a time", bos=True)])
    for i, text in enumerate(texts):
        row = generate(
            model,
            ids,
            12,
            job.sample.temperature,
            job.sample.top_k,
            job.sample.top_p,
            eos_token_id=tok.eos_id,
            seed=5 + i,
        )[0].tolist()
        row = row[: row.index(tok.eos_id, ids.shape[1])] if tok.eos_id in row[ids.shape[1] :] else row
        assert text == tok.decode(row)
        assert f"(seed {5 + i}) ---\n{text}\n" in out.getvalue()  # streamed pieces add up to the text


def test_sample_stage_reads_prompt_shorthand_and_stdin(saved_run, monkeypatch):
    job, _, _ = saved_run
    job.sample.num_samples, job.sample.max_new_tokens, job.sample.temperature = 1, 4, 0.0
    job.prompt = "The cat"
    assert run_sampling(job, out=io.StringIO())[0].startswith("The cat")
    job.sample.interactive = True
    monkeypatch.setattr("sys.stdin", io.StringIO("Tom went\n\nThe sun\n"))
    texts = run_sampling(job, out=io.StringIO())
    assert [t[:7] for t in texts] == ["Tom wen", "The sun"]  # blank lines skipped, stops at EOF


def test_too_long_prompts_are_refused_or_trimmed_from_the_left():
    ids = [1] + list(range(10, 70))  # <s> + 60 tokens
    assert fit_prompt(ids, max_new_tokens=3, context=64, trim=False) == ids
    with pytest.raises(ConfigError, match="61 tokens.*context of 64.*trim_prompt=true to keep its last 43"):
        fit_prompt(ids, max_new_tokens=20, context=64, trim=False)
    assert fit_prompt(ids, max_new_tokens=20, context=64, trim=True) == [1] + list(range(27, 70))
    with pytest.raises(ConfigError, match="lower sample.max_new_tokens"):
        fit_prompt(ids, max_new_tokens=64, context=64, trim=True)


def test_text_stream_never_prints_half_a_character(tiny_data):
    tok = ensure_tokenizer(tiny_data[1], tiny_data[0])
    text = "He saw 🤖 and ñ."
    ids = tok.encode(text, bos=True)
    assert len(ids) > len(text.split())  # the emoji falls back to several byte tokens
    out = io.StringIO()
    writes = []
    out.write = lambda s: writes.append(s)  # type: ignore[method-assign]
    stream = TextStream(tok, ids[:2], out)
    for t in ids[2:]:
        assert stream.put(t)
    assert not stream.put(tok.eos_id)
    stream.finish()
    assert "".join(writes) == text and not any("\ufffd" in w for w in writes)
