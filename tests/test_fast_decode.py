"""FastDecoder (the packed-weight decoding path of generate) equals the model's own forward: that
equality is its contract. Also: it follows every change of the weights, writes the cache only
through KVCache, and generate names the path it decodes with."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from tinyllama import kernels
from tinyllama.errors import ConfigError
from tinyllama.fast_decode import FastDecoder
from tinyllama.generate import generate, model_logits
from tinyllama.model import KVCache, LlamaConfig, LlamaForCausalLM, ModelParts
from tinyllama.model.mlp import MLP
from tinyllama.model.norm import RMSNorm

VOCAB = 80
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
)
CASES = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa, untied": {"num_key_value_heads": 1, "tie_word_embeddings": False},
    "llama biases": {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 2},
    "qwen2 q/k/v bias": {"model_type": "qwen2", "num_key_value_heads": 2},
    "llama3 rope past the context": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "max_position_embeddings": 16,
    },
    "dynamic rope past the context": {
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 16,
    },
    "gelu": {"hidden_act": "gelu"},
}


def make_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():  # non-zero biases and norm gains, so a dropped term shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
    return model


COMPILED = kernels.decode_unavailable()
# Both steps where this machine builds the compiled one; NumPy alone (and a visible skip) where not.
BACKENDS = [
    "numpy",
    pytest.param("compiled", marks=pytest.mark.skipif(COMPILED is not None, reason=f"{COMPILED}")),
]


def step_logits(model, step, prompt: torch.Tensor, new_tokens: torch.Tensor, mask=None, positions=None):
    """Logits after a prefill of `prompt` by the model (as generate runs it), then after each
    token of `new_tokens` (B, n) fed one at a time to `step`: a list of (B, V)."""
    B, T = prompt.shape
    cache = KVCache(model.config, B, T + new_tokens.shape[1], dtype=torch.float32)
    out = [model_logits(model, prompt, None if mask is None else mask[:, :T], positions, cache)]
    for i in range(new_tokens.shape[1]):
        step_mask = None if mask is None else mask[:, : T + i + 1]
        pos = None if positions is None else positions[:, -1:] + i + 1
        out.append(step(new_tokens[:, i : i + 1], step_mask, pos, cache))
    return out


def model_step(model):
    return lambda *a: model_logits(model, *a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_the_model_forward(case, backend):
    model = make_model(**CASES[case])
    assert FastDecoder.supports(model)
    if backend == "compiled" and FastDecoder.compiled_unsupported(model):
        pytest.skip(FastDecoder.compiled_unsupported(model))
    g = torch.Generator().manual_seed(1)
    prompt, new = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.inference_mode():
        expected = step_logits(model, model_step(model), prompt, new)
        got = step_logits(model, FastDecoder(model, backend=backend), prompt, new)
    for i, (e, o) in enumerate(zip(expected, got)):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, msg=f"{case}: step {i}")


@pytest.mark.skipif(COMPILED is not None, reason=f"{COMPILED}")
@pytest.mark.parametrize("head_dim", [4, 12, 16, 24, 40, 48, 64, 72, 136])
def test_compiled_attention_equals_the_model_forward_for_any_head_size(head_dim):
    """The compiled step's attention sums the values in whole vectors (up to four at a time) and
    a scalar tail: head sizes below, at, between and beyond those widths (4, 8 or 16 floats a
    vector, by the machine), over odd and even numbers of cached positions."""
    model = make_model(head_dim=head_dim, num_key_value_heads=2, max_position_embeddings=40)
    g = torch.Generator().manual_seed(head_dim)
    for length in (1, 2):
        prompt = torch.randint(0, VOCAB, (3, length), generator=g)
        new = torch.randint(0, VOCAB, (3, 9), generator=g)
        with torch.inference_mode():
            expected = step_logits(model, model_step(model), prompt, new)
            got = step_logits(model, FastDecoder(model, backend="compiled"), prompt, new)
        for i, (e, o) in enumerate(zip(expected, got)):
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, msg=f"head_dim {head_dim}: step {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_rows_equal_the_model_forward(backend):
    model = make_model(num_key_value_heads=2)
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    new = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # row 1: three padding tokens on the left
    positions = (mask[:, :7].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        expected = step_logits(model, model_step(model), prompt, new, mask, positions)
        got = step_logits(model, FastDecoder(model, backend=backend), prompt, new, mask, positions)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(COMPILED is not None, reason=f"{COMPILED}")
@pytest.mark.parametrize("weights", ["float32", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 17, 40])  # every tile shape the step uses, and remainders
def test_a_compiled_row_does_not_depend_on_the_rows_beside_it(weights, rows):
    """Each output is one chain of multiply-adds in a fixed order, whatever tile its row lands
    in: decoding a row inside a batch gives the bits it gets alone (same cache, same token)."""
    model = make_model(num_key_value_heads=2, vocab_size=200, intermediate_size=100)
    g = torch.Generator().manual_seed(14)
    prompt, new = torch.randint(0, 200, (rows, 6), generator=g), torch.randint(0, 200, (rows, 1), generator=g)
    decoder = FastDecoder(model, weights, backend="compiled")
    with torch.inference_mode():
        cache = KVCache(model.config, rows, 8, dtype=torch.float32)
        model_logits(model, prompt, None, None, cache)
        alone, written = [], []
        for r in range(rows):
            row_cache = KVCache(model.config, rows, 8, dtype=torch.float32)
            model_logits(model, prompt, None, None, row_cache)  # the same cache, then row r alone
            row_cache.select_rows(torch.tensor([r]))
            alone.append(decoder(new[r : r + 1], None, None, row_cache))
            written.append(row_cache.values[1][:, :, 6])
        together = decoder(new, None, None, cache)
    assert torch.equal(together, torch.cat(alone))
    assert torch.equal(cache.values[1][:, :, 6], torch.cat(written))  # the new position, in place


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cache_of_other_rows_is_refused_and_left_as_it_was(backend):
    model = make_model(num_key_value_heads=2)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(16))
    with torch.inference_mode():
        cache = KVCache(model.config, 2, 8, dtype=torch.float32)
        model_logits(model, prompt, None, None, cache)
        before = [k.clone() for k in cache.keys]
        with pytest.raises(ValueError):
            FastDecoder(model, backend=backend)(prompt[:1, -1:], None, None, cache)  # 1 row, cache of 2
    assert cache.lengths == [5, 5] and all(torch.equal(a, b) for a, b in zip(cache.keys, before))


def test_generate_gives_the_same_tokens_either_way():
    model = make_model(num_key_value_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5 if p.dim() > 1 else 1)  # sharper logits: greedy paths differ between prompts
    prompt = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    for kwargs in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "seed": 5}):
        fast = generate(model, prompt, max_new_tokens=20, **kwargs)
        slow = generate(model, prompt, max_new_tokens=20, fast=False, **kwargs)
        assert torch.equal(fast, slow), kwargs


@pytest.mark.parametrize("weights", ["float32", "int8"])
@pytest.mark.parametrize("hidden", [48, 40])  # whole strips of columns, and strips cut part-way
def test_a_change_to_any_one_weight_is_seen(weights, hidden):
    """matches() compares the packed copy run by run (whole strips, parts of strips, biases):
    one changed value in any row of any packed parameter makes the decoder stale (the norm
    gains and the embedding are read where they are, never copied)."""
    model = make_model(
        model_type="qwen2", num_key_value_heads=2, hidden_size=hidden, intermediate_size=2 * hidden + 8
    )
    decoder = FastDecoder(model, weights)
    assert decoder.matches(model)
    g = torch.Generator().manual_seed(0)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    packed = [(f"{name}.{n}", p) for name, m in linears for n, p in m.named_parameters()]
    assert len(packed) == 2 * (7 + 3) + 1  # per layer 7 weights and 3 biases (q, k, v), and the head
    for name, p in packed:
        for row in range(p.shape[0]):  # every row, at a random column
            i = row * p[0].numel() + int(torch.randint(0, p[0].numel(), (1,), generator=g))
            before = p.view(-1)[i].item()
            with torch.no_grad():
                p.view(-1)[i] = before + 0.5
            assert not decoder.matches(model), (name, row)
            with torch.no_grad():
                p.view(-1)[i] = before
    assert decoder.matches(model)


def test_packed_weights_follow_weight_changes():
    model = make_model()
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(6))
    first = FastDecoder.for_model(model)
    assert FastDecoder.for_model(model) is first  # reused while the weights stay the same
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)  # an in-place change, as an optimizer makes
    assert FastDecoder.for_model(model) is not first
    assert torch.equal(
        generate(model, prompt, 8, temperature=0.0), generate(model, prompt, 8, temperature=0.0, fast=False)
    )
    second = FastDecoder.for_model(model)
    model.model.layers[1].mlp.act_fn = torch.nn.Tanh()  # a swapped module, no parameter touched
    assert FastDecoder.for_model(model) is not second
    assert torch.equal(
        generate(model, prompt, 8, temperature=0.0), generate(model, prompt, 8, temperature=0.0, fast=False)
    )
    third = FastDecoder.for_model(model)
    model.model.layers[1].self_attn.q_proj.weight.data[0, 0] += 1.0  # a write no autograd sees
    assert FastDecoder.for_model(model) is not third
    fourth = FastDecoder.for_model(model)
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach() * 2)  # replaced
    assert FastDecoder.for_model(model) is not fourth
    assert torch.equal(
        generate(model, prompt, 8, temperature=0.0), generate(model, prompt, 8, temperature=0.0, fast=False)
    )
    # The packed copy lives beside the model, not in it: saving the model saves its weights once.
    assert saved_size(model) < 1.2 * saved_size(make_model())


def saved_size(model) -> int:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.tell()


def test_sampling_from_a_checkpointed_model_in_train_mode_keeps_the_prompt():
    model = make_model()
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(11))
    expected = generate(model, prompt, 6, temperature=0.0)
    model.model.gradient_checkpointing = True
    model.train()  # no dropout in this config: the same math, and no gradients while sampling
    for fast in (True, False):
        assert torch.equal(generate(model, prompt, 6, temperature=0.0, fast=fast), expected)


class ScaledRMSNorm(RMSNorm):
    def forward(self, hidden_states):
        return 2 * super().forward(hidden_states)


class ScaledMLP(MLP):
    def forward(self, x):
        return 3 * super().forward(x)


def test_a_custom_norm_runs_inside_the_fast_path():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BASE), parts=ModelParts(norm=ScaledRMSNorm)).eval()
    assert FastDecoder.supports(model)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    new = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected = step_logits(model, model_step(model), prompt, new)
        got = step_logits(model, FastDecoder(model), prompt, new)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    # with grad mode on, as the sample and chat stages call it: the norm's gain requires grad
    assert torch.is_grad_enabled()
    assert torch.equal(
        generate(model, prompt, 6, temperature=0.0), generate(model, prompt, 6, temperature=0.0, fast=False)
    )


def test_the_decoding_path_is_logged_by_name(caplog):
    model = make_model()
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(12))
    with caplog.at_level(logging.DEBUG, logger="tinyllama.generate"):
        generate(model, prompt, 3, temperature=0.0)
        generate(model, prompt, 3, temperature=0.0, fast=False)
        generate(model, prompt, 3, temperature=0.0, weights="int8")
        generate(model.to(torch.float64), prompt, 3, temperature=0.0)
    step = "numpy" if COMPILED else "compiled"
    assert [r.getMessage() for r in caplog.records if r.name == "tinyllama.generate"] == [
        f"decoding steps run through fast_decode.FastDecoder ({step}, packed float32 weights)",
        "decoding steps run through the model's forward (fast=False)",
        f"decoding steps run through fast_decode.FastDecoder ({step}, packed int8 weights)",
        "decoding steps run through the model's forward (weights not float32 on the CPU)",
    ]


def test_unknown_parts_and_sliding_windows_use_the_model_itself():
    custom = LlamaForCausalLM(LlamaConfig(**BASE), parts=ModelParts(mlp=ScaledMLP)).eval()
    windowed = make_model(model_type="qwen2", sliding_window=4, max_window_layers=1)
    assert FastDecoder.unsupported(custom) == "custom attention, MLP or rotary parts"
    assert FastDecoder.unsupported(windowed) == "sliding-window layers"
    for model in (custom, windowed):
        assert not FastDecoder.supports(model)
        prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
        expected = prompt
        with torch.no_grad():
            for _ in range(6):
                expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generate(model, prompt, 6, temperature=0.0), expected)


def test_a_full_cache_grows_and_prompts_are_refused():
    model = make_model()
    decoder = FastDecoder(model)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 6, dtype=torch.float32)  # no room for a new token
        model_logits(model, prompt, None, None, cache)
        got = decoder(prompt[:, -1:], None, None, cache)
        assert cache.get_seq_length() == 7 and cache.keys[0].shape[2] >= 7
        expected = model(torch.cat([prompt, prompt[:, -1:]], dim=1)).logits[:, -1]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="run the prompt through the model"):
            decoder(prompt, None, None, cache)  # several tokens: a prompt
        with pytest.raises(ValueError, match="run the prompt through the model"):
            decoder(
                prompt[:, -1:], None, None, KVCache(model.config, 1, 6, dtype=torch.float32)
            )  # empty cache


@pytest.mark.parametrize(
    "case",
    ["mha", "gqa", "llama biases", "qwen2 q/k/v bias"],
)
@pytest.mark.parametrize("intermediate_size", [96, 100])  # 100: not a multiple of the kernel's 16
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_weights_stay_close_to_float32(case, intermediate_size, backend):
    """int8 weight-only decoding: each weight is off by at most half its channel's step
    (max |w| / 254) and each product's input and output by bfloat16 rounding (2^-9 relative), so
    the logits move by a few parts in a thousand of their norm; 5% bounds that with room, and
    any broken matrix (a wrong scale, garbage from the kernel) lands far beyond it. They do move:
    this is not the float32 path under another name."""
    model = make_model(**CASES[case], intermediate_size=intermediate_size)
    g = torch.Generator().manual_seed(1)
    prompt, new = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.inference_mode():
        expected = step_logits(model, model_step(model), prompt, new)
        int8 = FastDecoder(model, "int8", backend=backend)
        got = step_logits(model, int8, prompt, new)
    for i, (e, o) in enumerate(zip(expected[1:], got[1:])):
        error = ((o - e).norm() / e.norm()).item()
        assert 0 < error < 0.05, f"{case}: step {i}: relative error {error:.2e}"
    float32 = FastDecoder(model, backend=backend)
    assert int8.nbytes < 0.3 * float32.nbytes  # a byte per weight (and the scales), not four


def test_int8_weights_follow_weight_changes_and_need_the_fast_path():
    model = make_model()
    first = FastDecoder.for_model(model, "int8")
    assert FastDecoder.for_model(model, "int8") is first
    assert FastDecoder.for_model(model) is not first  # float32 is another decoder
    model.model.layers[0].mlp.up_proj.weight.data[3, 2] += 0.5  # a write no autograd sees
    assert FastDecoder.for_model(model, "int8") is not first
    prompt = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="sample.weights=int8 runs on the CPU decoding path.*fast=False"):
        generate(model, prompt, 4, weights="int8", fast=False)
    with pytest.raises(ConfigError, match="weights not float32"):
        generate(model.to(torch.float64), prompt, 4, weights="int8")


def test_float32_blocks_follow_the_thread_count_and_int8_does_not():
    model = make_model()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(13))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, int8 = FastDecoder(model, backend="numpy"), FastDecoder.for_model(model, "int8")
        torch.set_num_threads(2)
        two = FastDecoder(model, backend="numpy")
        assert (one.parts, two.parts) == (2, 4)
        assert FastDecoder.for_model(model, "int8") is int8  # no blocks to repack
        assert torch.equal(
            generate(model, prompt, 6, temperature=0.0),
            generate(model, prompt, 6, temperature=0.0, fast=False),
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fresh_kernel_load():
    """kernels' build and load decided anew in the test, and again after it."""
    kernels._load.cache_clear()
    yield
    kernels._load.cache_clear()


def test_without_a_working_compiler_decoding_runs_in_numpy(monkeypatch, tmp_path, fresh_kernel_load, caplog):
    model = make_model()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(15))
    expected = generate(model, prompt, 6, temperature=0.0, fast=False)
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # found, and fails on every source
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    assert kernels.decode_unavailable() == "/bin/false failed on decode.c: no message"
    with caplog.at_level(logging.INFO, logger="tinyllama.kernels"):
        assert FastDecoder(model).backend == "numpy"
        FastDecoder(model)
    assert [r.getMessage() for r in caplog.records if r.name == "tinyllama.kernels"] == [
        "CPU decoding runs in NumPy, without the compiled step: /bin/false failed on decode.c: no message"
    ]  # once, not per decoder
    with pytest.raises(ValueError, match="compiled decoding step cannot run this model: /bin/false failed"):
        FastDecoder(model, backend="compiled")
    assert torch.equal(generate(model, prompt, 6, temperature=0.0), expected)
    assert not any(tmp_path.rglob("decode.so"))  # and no half-built library left behind
    kernels._load.cache_clear()
    monkeypatch.setenv("TINYLLAMA_KERNELS", "0")
    assert kernels.decode_unavailable() == "TINYLLAMA_KERNELS=0"


@pytest.mark.skipif(COMPILED is not None, reason=f"{COMPILED}")
def test_the_compiled_step_is_built_once_into_the_cache(monkeypatch, tmp_path, fresh_kernel_load):
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))
    assert kernels.decode_library() is not None
    built = list(tmp_path.rglob("decode.so"))
    assert len(built) == 1 and built[0].parent.parent == tmp_path / "kernels"
    stamp = built[0].stat().st_mtime_ns
    kernels._load.cache_clear()
    assert kernels.decode_library() is not None  # a second process finds it: no new build
    assert built[0].stat().st_mtime_ns == stamp and list(tmp_path.rglob("decode.so")) == built
