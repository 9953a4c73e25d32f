"""generate(): cached decoding equals full recomputation, left-padded batches equal single
prompts, seeds reproduce, filters never leave their allowed set, EOS stops."""

from __future__ import annotations

import pytest
import torch

from tinyllama.errors import ConfigError
from tinyllama.generate import draw, generate, next_token, stream_tokens
from tinyllama.model import KVCache, LlamaConfig, LlamaForCausalLM

VOCAB = 64


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=request.param,
    )
    m = LlamaForCausalLM(cfg).eval()
    # Larger weights than the 0.02 init: sharper logits, so greedy paths vary between prompts.
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(10 if p.dim() > 1 else 1)
    return m


def greedy_without_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: re-run the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_with_cache_equals_full_recomputation(model):
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (2, 18)
    assert torch.equal(out, greedy_without_cache(model, prompt, 12))


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_left_padded_batch_equals_one_by_one(model, repetition_penalty):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 3, 5)]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), T, dtype=torch.long)  # pad id 0, never attended to
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    out = generate(
        model,
        batch,
        max_new_tokens=10,
        temperature=0.0,
        attention_mask=mask,
        repetition_penalty=repetition_penalty,
    )
    for i, p in enumerate(prompts):
        alone = generate(
            model, p[None], max_new_tokens=10, temperature=0.0, repetition_penalty=repetition_penalty
        )
        assert torch.equal(out[i, T - len(p) :], alone[0]), f"row {i}"


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=20, temperature=1.5, top_k=None, top_p=None)
    a = generate(model, prompt, seed=7, **kwargs)
    assert torch.equal(a, generate(model, prompt, seed=7, **kwargs))
    assert not torch.equal(a, generate(model, prompt, seed=8, **kwargs))


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_num_return_sequences_continues_each_prompt_as_its_repeated_rows_would(model, repetition_penalty):
    """One prefill per prompt, its cache copied to G rows: the same logits as G copies of the
    prompt, so greedy rows equal theirs and a seed samples what it samples for the copies
    (a sample flips only where float32 rounding of the prefill would cross a boundary of the
    multinomial draw)."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (6, 3)]
    batch = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, 6 - len(p) :], mask[i, 6 - len(p) :] = p, 1
    for temperature, seed in ((0.0, None), (1.2, 5)):
        kwargs = dict(
            max_new_tokens=9,
            temperature=temperature,
            top_p=None,
            seed=seed,
            repetition_penalty=repetition_penalty,
        )
        shared = generate(model, batch, attention_mask=mask, num_return_sequences=3, **kwargs)
        copies = generate(
            model,
            batch.repeat_interleave(3, dim=0),
            attention_mask=mask.repeat_interleave(3, dim=0),
            **kwargs,
        )
        assert shared.shape == (6, 15)
        assert torch.equal(shared, copies), f"temperature {temperature}"
    assert not torch.equal(shared[0], shared[1])  # sampled rows of one prompt differ


def test_eos_stops_generation_and_fills_finished_rows(model):
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    free = generate(model, prompt, max_new_tokens=12, temperature=0.0)[:, 5:].tolist()
    eos = free[0][2]  # row 0 produces this token as its third new one
    out = generate(model, prompt, max_new_tokens=12, temperature=0.0, eos_token_id=eos)
    stop = [row.index(eos) + 1 if eos in row else 12 for row in free]  # new tokens until EOS
    assert out.shape[1] == 5 + max(stop)  # stops once every row has produced EOS
    for r in range(2):
        assert out[r, 5 : 5 + stop[r]].tolist() == free[r][: stop[r]]
        assert (out[r, 5 + stop[r] :] == eos).all()  # a finished row keeps emitting EOS


def test_stream_yields_the_tokens_generate_returns(model):
    prompt = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(5))
    steps = list(stream_tokens(model, prompt, max_new_tokens=6, temperature=0.9, seed=11))
    assert [s.shape for s in steps] == [(1,)] * 6
    out = generate(model, prompt, max_new_tokens=6, temperature=0.9, seed=11)
    assert torch.equal(torch.stack(steps, dim=1), out[:, 4:])


def test_repetition_penalty_discourages_seen_tokens(model):
    prompt = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    out = generate(model, prompt, max_new_tokens=20, temperature=0.0, repetition_penalty=1e6)
    # Positive logits of seen tokens are divided by 1e6, negative multiplied: with 64 tokens
    # and 24 positions some unseen token always has a larger logit than any seen one.
    assert len(set(out[0].tolist())) == 24


def _draw(logits: torch.Tensor, n: int, **kw) -> set:
    tokens = next_token(
        logits.expand(n, -1).clone(),
        kw.pop("temperature", 1.0),
        kw.pop("top_k", None),
        kw.pop("top_p", None),
        1.0,
        None,
        torch.Generator().manual_seed(0),
    )
    return set(tokens.tolist())


def test_top_k_never_emits_outside_the_k_most_likely():
    logits = torch.tensor([[2.0, 0.5, 1.9, -1.0, 1.8, 0.0]])
    assert _draw(logits, 4000, top_k=3) == {0, 2, 4}
    assert _draw(logits, 4000, top_k=1) == {0}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert _draw(logits, 4000, top_p=0.75) == {1, 3}  # 0.5 + 0.3 >= 0.75
    assert _draw(logits, 4000, top_p=0.9) == {1, 2, 3}  # 0.5 + 0.3 + 0.15 >= 0.9
    assert _draw(logits, 4000, top_p=0.4) == {1}  # the most likely token always stays
    assert _draw(logits, 4000, top_p=0.9, top_k=2) == {1, 3}  # top-k applies first


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    n = 40000
    tokens = next_token(
        logits.expand(n, -1).clone(), 2.0, None, None, 1.0, None, torch.Generator().manual_seed(0)
    )
    freq = torch.bincount(tokens, minlength=3).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.01)


def test_bad_arguments_raise_one_clear_error(model):
    prompt = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="temperature=-1.*top_p=1.5"):
        generate(model, prompt, temperature=-1, top_p=1.5)
    with pytest.raises(ConfigError, match="num_return_sequences=0"):
        generate(model, prompt, num_return_sequences=0)
    assert torch.equal(generate(model, prompt, max_new_tokens=0), prompt)


def test_rows_that_finish_leave_the_batch_and_the_others_go_on_as_alone(model, monkeypatch):
    """Once half the rows have produced EOS their cache rows are dropped; the remaining rows
    decode what they decode alone, and the dropped ones keep emitting EOS."""
    g = torch.Generator().manual_seed(8)
    prompts = torch.randint(3, VOCAB, (4, 5), generator=g)
    alone = [
        generate(model, prompts[i : i + 1], max_new_tokens=12, temperature=0.0)[0, 5:].tolist()
        for i in range(4)
    ]

    def ends(eos):  # new tokens each row makes up to and including its EOS
        return [row.index(eos) + 1 if eos in row else 12 for row in alone]

    # an EOS at which half the rows finish while the others go on
    eos = next(t for t in range(VOCAB) if sorted(ends(t))[1] < max(ends(t)))
    selected = []
    original = KVCache.select_rows
    monkeypatch.setattr(
        KVCache, "select_rows", lambda self, index: (selected.append(index.tolist()), original(self, index))
    )
    out = generate(model, prompts, max_new_tokens=12, temperature=0.0, eos_token_id=eos)
    ends = ends(eos)
    for i in range(4):
        assert out[i, 5 : 5 + ends[i]].tolist() == alone[i][: ends[i]]
        assert (out[i, 5 + ends[i] :] == eos).all()
    assert selected and len(selected[0]) == 4 - sum(e <= sorted(ends)[1] for e in ends)


def test_rows_with_their_own_generators_draw_what_they_draw_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(9))
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    together = next_token(logits, 1.3, None, 0.9, 1.0, None, generators)
    alone = [
        next_token(logits[i : i + 1], 1.3, None, 0.9, 1.0, None, torch.Generator().manual_seed(s))
        for i, s in enumerate((1, 2, 3))
    ]
    assert together.tolist() == [int(t) for t in alone]


def test_a_row_that_is_not_finite_still_gives_a_token_id():
    logits = torch.tensor([[float("nan")] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]])
    for top_p in (None, 0.9):
        tokens = next_token(logits, 1.0, None, top_p, 1.0, None, torch.Generator().manual_seed(0))
        assert ((tokens >= 0) & (tokens < 5)).all()


def test_draw_never_picks_a_token_of_probability_zero():
    probs = torch.zeros(2000, 6)
    probs[:, 2], probs[:, 4] = 0.25, 0.75
    tokens = draw(probs, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {2, 4}
    assert abs((tokens == 4).float().mean().item() - 0.75) < 0.05
