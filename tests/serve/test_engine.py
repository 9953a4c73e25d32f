"""The engine alone (no HTTP): a seeded row samples what `generate` samples with that seed, beside
other rows and past the block of uniform numbers a row draws at once."""

from __future__ import annotations

import threading

import torch

from tinyllama.generate import generate
from tinyllama.serve.engine import Engine, Request, SamplingParams, _Row


def _collect(engine: Engine, prompt, params: SamplingParams):
    """Submit one request; returns (done event, {choice: [tokens]})."""
    tokens = {c: [] for c in range(params.n)}
    done, finished = threading.Event(), set()

    def emit(choice, token, finish):
        tokens[choice].append(token)
        if finish is not None:
            finished.add(choice)
            if len(finished) == params.n:
                done.set()

    engine.submit(Request(prompt, params, emit))
    return done, tokens


def test_seeded_rows_sample_what_generate_samples_with_their_seeds(tiny_chat_model):
    torch.manual_seed(0)
    model = tiny_chat_model(64, context=256).eval()
    new = _Row.BLOCK + 20  # past the first block of uniform numbers
    prompts = [[5, 9, 11, 3], [7, 2, 30, 41, 8, 1, 6]]
    engine = Engine(model, max_batch=8)
    sampled = _collect(engine, prompts[0], SamplingParams(new, temperature=1.0, top_p=0.9, seed=11, n=2))
    beside = _collect(engine, prompts[1], SamplingParams(new, temperature=0.7, seed=3))
    greedy = _collect(engine, prompts[1], SamplingParams(new // 2, temperature=0.0))
    engine.start()  # all submitted first: they join the batch together
    try:
        for done, _ in (sampled, beside, greedy):
            assert done.wait(120)
    finally:
        engine.stop()
    assert engine.largest_batch == 4  # the two choices, the other sampled row and the greedy one
    for (_, tokens), prompt, settings, seeds in (
        (sampled, prompts[0], dict(temperature=1.0, top_p=0.9), (11, 12)),
        (beside, prompts[1], dict(temperature=0.7, top_p=None), (3,)),
    ):
        for choice, seed in enumerate(seeds):
            alone = generate(model, torch.tensor([prompt]), max_new_tokens=new, seed=seed, **settings)
            assert tokens[choice] == alone[0, len(prompt) :].tolist()
