"""GGUF export. Without llama-cpp-python: the file read back with gguf.GGUFReader holds every
tensor (names, shapes, values in llama.cpp's RoPE layout) and metadata key of the checkpoint,
the layout change is proven on the RoPE arithmetic, and what llama.cpp cannot run is refused.
With llama-cpp-python installed (pip install llama-cpp-python; it builds from source): llama.cpp
itself reproduces our token ids, logits and greedy text."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tinyllama.chat_template import CHAT_PIECES, CHAT_TEMPLATE
from tinyllama.errors import ConfigError
from tinyllama.model import LlamaConfig, LlamaForCausalLM
from tinyllama.model.rotary import RotaryEmbedding, apply_rotary_pos_emb

gguf = pytest.importorskip("gguf")
from tinyllama.export_gguf import export_gguf, interleave_rope_rows, modelfile  # noqa: E402

SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
VARIANTS = {
    "llama_gqa_tied": dict(),
    "llama_mha_untied_bias_linear_rope": dict(
        num_key_value_heads=None,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "llama_llama3_rope": dict(
        rope_theta=5e5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 2.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2_bias_untied": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=1e6),
}


@pytest.fixture(scope="module")
def sp_tokenizer(tiny_data):
    from tinyllama.tokenizer import ensure_tokenizer

    data, tok_cfg = tiny_data
    return ensure_tokenizer(tok_cfg, data)


def tiny_model(vocab_size: int, scale: float = 10.0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**SHAPE, **overrides})).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy text is not a near-tie
        for p in model.parameters():
            p.mul_(scale if p.dim() > 1 else 1)
            if p.dim() == 1 and p.abs().sum() == 0:  # biases start at zero: make them matter
                p.normal_(0, 0.1)
    return model


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def expected_tensors(model: LlamaForCausalLM) -> dict:
    """GGUF name -> float32 array llama.cpp must find, built from our weights by name rules
    written out here (not by the exporter's own name map)."""
    cfg = model.config
    renames = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        elif key.startswith("model.layers."):
            _, _, i, *rest = key.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            name = f"blk.{i}.{renames[module]}.{suffix}"
            if cfg.model_type == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if "q_proj" in module else cfg.resolved_num_key_value_heads
                t = interleave_rope_rows(t, heads)
        else:
            name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
            }[key]
        out[name] = t.float().numpy()
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_file_holds_every_tensor_and_key_of_the_checkpoint(tmp_path, sp_tokenizer, variant):
    model = tiny_model(sp_tokenizer.vocab_size, **VARIANTS[variant])
    cfg = model.config
    path = export_gguf(model, tmp_path / "gguf", tokenizer_path=sp_tokenizer.model_path, name="tiny")
    assert path == tmp_path / "gguf" / "tiny-F32.gguf" and (path.parent / "Modelfile").is_file()
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    want = expected_tensors(model)
    if variant == "llama_llama3_rope":
        want["rope_freqs.weight"] = None  # checked below
    assert set(tensors) == set(want)
    for name, array in want.items():
        if array is not None:
            assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(tensors[name].data), array, err_msg=name)
    arch = cfg.model_type
    kv = fields(reader)
    assert kv["general.architecture"] == arch and kv["general.name"] == "tiny"
    assert kv["general.file_type"] == gguf.LlamaFileType.ALL_F32
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = {
        "context_length": 32,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": cfg.resolved_num_key_value_heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": head_dim,
        "vocab_size": sp_tokenizer.vocab_size,
    }
    for key, value in expected.items():
        assert kv[f"{arch}.{key}"] == value, key
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert kv[f"{arch}.rope.freq_base"] == cfg.rope_theta
    rope = cfg.rope_scaling or {}
    assert kv.get(f"{arch}.rope.scaling.type") == ("linear" if rope.get("rope_type") == "linear" else None)
    assert kv.get(f"{arch}.rope.scaling.factor") == (2.0 if rope.get("rope_type") == "linear" else None)
    if variant == "llama_llama3_rope":
        # llama.cpp divides each frequency by rope_freqs[i]: 1 below a wavelength of 64 / 2 tokens,
        # `factor` above 64 / 1, and 1 / ((1 - s) / factor + s) between, s = (64 / wavelength - 1) / (2 - 1).
        wavelength = 2 * np.pi * 5e5 ** (np.arange(0, head_dim, 2) / head_dim)
        s = 64 / wavelength - 1.0
        want = np.where(wavelength < 32, 1.0, np.where(wavelength > 64, 4.0, 1 / ((1 - s) / 4.0 + s)))
        freqs = np.asarray(tensors["rope_freqs.weight"].data)
        assert freqs[0] == 1.0 and freqs[-1] == 4.0 and 1 < freqs[1] < 4  # all three bands occur
        np.testing.assert_allclose(freqs, want, rtol=1e-5)


def test_gguf_vocabulary_is_the_sentencepiece_model(tmp_path, sp_tokenizer):
    sp = sp_tokenizer.sp
    model = tiny_model(sp_tokenizer.vocab_size + 3)  # an embedding table larger than the vocabulary
    path = export_gguf(model, tmp_path / "g", tokenizer_path=sp_tokenizer.model_path)
    kv = fields(gguf.GGUFReader(path))
    # The Modelfile stops where the model ends a text: at this tokenizer's own eos piece.
    assert f'PARAMETER stop "{sp.id_to_piece(sp.eos_id())}"' in (path.parent / "Modelfile").read_text()
    n = sp.get_piece_size()
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert len(kv["tokenizer.ggml.tokens"]) == n + 3 and kv["tokenizer.ggml.token_type"][n:] == [5] * 3
    np.testing.assert_array_equal(
        np.float32(kv["tokenizer.ggml.scores"][:n]), np.float32([sp.get_score(i) for i in range(n)])
    )
    types = kv["tokenizer.ggml.token_type"]
    kinds = {2: sp.is_unknown, 3: sp.is_control, 6: sp.is_byte}  # GGUF's numbers
    user_defined = set(CHAT_PIECES)  # the tokenizer's user_defined_symbols: GGUF's 4, like SentencePiece's
    for i in range(n):
        expected = (
            4
            if sp.id_to_piece(i) in user_defined
            else next((k for k, is_kind in kinds.items() if is_kind(i)), 1)
        )
        assert types[i] == expected, sp.id_to_piece(i)
    assert sum(t == 6 for t in types) == 256  # byte fallback pieces
    assert (
        kv["tokenizer.ggml.bos_token_id"],
        kv["tokenizer.ggml.eos_token_id"],
        kv["tokenizer.ggml.unknown_token_id"],
    ) == (1, 2, 0)
    assert "tokenizer.ggml.padding_token_id" not in kv  # the preset has no <pad>
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.ggml.add_space_prefix"] is True
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE  # the default tokenizer has the chat pieces
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = export_gguf(
        model, tmp_path / "chat", tokenizer_path=sp_tokenizer.model_path, chat_template=template
    )
    assert fields(gguf.GGUFReader(path))["tokenizer.chat_template"] == template
    assert "TEMPLATE" not in (path.parent / "Modelfile").read_text().replace("# TEMPLATE", "")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "q8_0"])
def test_gguf_dtypes_store_2d_weights_as_asked(tmp_path, sp_tokenizer, dtype):
    model = tiny_model(sp_tokenizer.vocab_size, tie_word_embeddings=False)
    path = export_gguf(model, tmp_path / "g", tokenizer_path=sp_tokenizer.model_path, dtype=dtype)
    kind = {"float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert path.name == f"model-{kind}.gguf"
    reader = gguf.GGUFReader(path)
    assert (
        fields(reader)["general.file_type"]
        == gguf.LlamaFileType[f"MOSTLY_{'F16' if kind == 'F16' else kind}"]
    )
    for t in reader.tensors:
        want = expected_tensors(model)[t.name]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        if want.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(got, want)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType[kind], t.name
        if dtype == "q8_0":
            # Per block of 32: scale d = max|x| / 127 stored as float16 (relative error <= 2^-11),
            # q = round(x / d) in [-127, 127]: |x - q d'| <= d / 2 + 127 d 2^-11 < 0.6 d.
            blocks = np.abs(want).reshape(-1, 32)
            bound = 0.6 * blocks.max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got - want).reshape(-1, 32) <= bound), t.name
        else:
            torch_dtype = torch.float16 if dtype == "float16" else torch.bfloat16
            rounded = torch.from_numpy(want).to(torch_dtype).float().numpy()
            np.testing.assert_array_equal(got, rounded, err_msg=t.name)


def test_interleaved_rows_turn_half_split_rope_into_llama_cpp_adjacent_pair_rope():
    """llama.cpp's LLM_ARCH_LLAMA rotates channels (2i, 2i+1) by pos * inv_freq[i] (its "normal"
    RoPE); ours rotates (i, i + D/2). Rotating the reordered projection the llama.cpp way must
    give our rotated vector, reordered: then every q . k, hence attention, is unchanged."""
    cfg = LlamaConfig(
        vocab_size=8,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=8,
        num_hidden_layers=1,
        max_position_embeddings=16,
    )
    heads, d, t = 2, 16, 12
    x = torch.randn(t, heads * d, generator=torch.Generator().manual_seed(0))  # q_proj outputs (T, H*D)
    pos = torch.arange(t)[None]
    cos, sin = RotaryEmbedding(cfg)(x, pos)
    ours, _ = apply_rotary_pos_emb(x.view(1, t, heads, d).transpose(1, 2), x.new_zeros(1, 1, t, d), cos, sin)
    ours = ours.transpose(1, 2).reshape(t, heads * d)  # (T, H*D), half-split layout
    inv_freq = RotaryEmbedding(cfg).inv_freq
    y = interleave_rope_rows(x.T, heads).T.reshape(t, heads, d // 2, 2)  # adjacent pairs
    angle = pos[0, :, None, None] * inv_freq[None, None, :]  # (T, 1, D/2)
    a, b = y[..., 0], y[..., 1]
    theirs = torch.stack((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), -1)
    torch.testing.assert_close(
        theirs.reshape(t, heads * d), interleave_rope_rows(ours.T, heads).T, rtol=0, atol=1e-5
    )


def test_models_llama_cpp_cannot_run_are_refused_and_nothing_is_written(tmp_path, sp_tokenizer):
    v, tok = sp_tokenizer.vocab_size, sp_tokenizer.model_path
    cases = {
        "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "sliding window": dict(model_type="qwen2", sliding_window=8),
        "rope_freqs for Llama only": dict(
            model_type="qwen2",
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "q/k/v biases only": dict(model_type="qwen2", mlp_bias=True),
        "silu only": dict(hidden_act="gelu"),
    }
    for match, overrides in cases.items():
        with pytest.raises(ConfigError, match=match):
            export_gguf(tiny_model(v, **overrides), tmp_path / "g", tokenizer_path=tok)
    with pytest.raises(ConfigError, match="choose one of float32"):
        export_gguf(tiny_model(v), tmp_path / "g", tokenizer_path=tok, dtype="q4_0")
    with pytest.raises(ConfigError, match="tokenizer_path"):
        export_gguf(tiny_model(v), tmp_path / "g")
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "g"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export_gguf(tiny_model(v), out, tokenizer_path=tok)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export_gguf(tiny_model(v), out, tokenizer_path=tok, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-F32.gguf"]
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # no temporary folder left behind


def test_a_normalizing_tokenizer_is_warned_about(tmp_path, sp_tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_tokenizer.model_path.read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (tmp_path / "norm.model").write_bytes(proto.SerializeToString())
    with pytest.warns(UserWarning, match="llama.cpp applies no SentencePiece normalization"):
        export_gguf(
            tiny_model(sp_tokenizer.vocab_size), tmp_path / "g", tokenizer_path=tmp_path / "norm.model"
        )


def test_modelfile_carries_the_template_stop_token_and_sampling_settings():
    cfg = LlamaConfig(
        vocab_size=8,
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=8,
        num_hidden_layers=1,
        max_position_embeddings=256,
    )
    text = modelfile(
        "demo-Q8_0.gguf",
        cfg,
        {
            "do_sample": True,
            "max_new_tokens": 200,
            "temperature": 0.8,
            "top_p": 0.95,
            "repetition_penalty": 1.1,
        },
        None,
        "</s>",
    )
    lines = text.splitlines()
    assert "FROM ./demo-Q8_0.gguf" in lines and 'TEMPLATE """{{ .Prompt }}"""' in lines
    for line in (
        'PARAMETER stop "</s>"',
        "PARAMETER num_ctx 256",
        "PARAMETER num_predict 200",
        "PARAMETER temperature 0.8",
        "PARAMETER top_p 0.95",
        "PARAMETER repeat_penalty 1.1",
        "PARAMETER top_k 0",
    ):  # the run has no top-k: Ollama's default 40 is switched off
        assert line in lines
    greedy = modelfile("x.gguf", cfg, {"do_sample": False, "max_new_tokens": 5}, None, None).splitlines()
    assert "PARAMETER temperature 0" in greedy and not any("top_p" in line for line in greedy)


def test_export_gguf_stage_writes_the_run_into_its_gguf_folder(saved_run, capsys):
    from pathlib import Path

    from tinyllama.export_gguf import run_export_gguf

    job = saved_run[0]
    job.sample.temperature, job.sample.top_k = 0.7, 40
    path = run_export_gguf(job)
    assert path == Path(job.run.dir) / "gguf" / "run-F32.gguf"
    out = capsys.readouterr().out
    assert "verified with llama.cpp" in out or "verify skipped: llama-cpp-python is not installed" in out
    modelfile_lines = (path.parent / "Modelfile").read_text().splitlines()
    assert "PARAMETER temperature 0.7" in modelfile_lines and "PARAMETER top_k 40" in modelfile_lines
    job.export.dtype, job.export.out_dir, job.export.verify = "q8_0", str(path.parent.parent / "q8"), False
    assert run_export_gguf(job).name == "run-Q8_0.gguf"
    with pytest.raises(ConfigError, match="already exists"):
        run_export_gguf(job)


# ---- llama.cpp itself (llama-cpp-python) ----------------------------------------------------


def llama_cpp_or_skip():
    return pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed "
        "(pip install llama-cpp-python; builds llama.cpp from source)",
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_reproduces_logits_token_ids_and_greedy_text(tmp_path, sp_tokenizer, variant):
    llama_cpp_or_skip()
    from tinyllama.export_gguf import verify_with_llama_cpp

    model = tiny_model(sp_tokenizer.vocab_size, **VARIANTS[variant])
    path = export_gguf(model, tmp_path / "g", tokenizer_path=sp_tokenizer.model_path)
    # 30 new tokens: past max_position_embeddings=32 with the prompt, where linear/llama3 scaling matter.
    report = verify_with_llama_cpp(path, model, sp_tokenizer, max_new_tokens=30, n_threads=1)
    assert report["max_rel_logit_error"] < 1e-4, report
    assert report["same_greedy_text"] and report["same_token_ids"] and report["same_decoded_text"], report


def test_llama_cpp_tokenizes_like_sentencepiece(tmp_path, sp_tokenizer, tiny_data):
    llama_cpp = llama_cpp_or_skip()
    from tinyllama.data import iter_documents
    from tinyllama.export_gguf import VERIFY_TEXTS

    path = export_gguf(
        tiny_model(sp_tokenizer.vocab_size), tmp_path / "g", tokenizer_path=sp_tokenizer.model_path
    )
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    texts = list(iter_documents(tiny_data[0], "val"))[:20] + list(VERIFY_TEXTS) + ["", " ", "\n\n  \t", "a"]
    for text in texts:
        ids = sp_tokenizer.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False) == ids, text
        assert llm.tokenize(text.encode("utf-8")) == [sp_tokenizer.bos_id] + ids, text
        assert llm.detokenize([sp_tokenizer.bos_id] + ids).decode("utf-8") == text, text


def test_llama_cpp_q8_0_mostly_agrees(tmp_path, sp_tokenizer):
    llama_cpp_or_skip()
    from tinyllama.export_gguf import verify_with_llama_cpp

    # Weights x3 (not x10): random weights that large amplify rounding through every layer far
    # beyond what a trained model shows (the demo run's q8_0 file: 0.45% relative logit error).
    model = tiny_model(sp_tokenizer.vocab_size, scale=3.0, tie_word_embeddings=False)
    path = export_gguf(model, tmp_path / "g", tokenizer_path=sp_tokenizer.model_path, dtype="q8_0")
    report = verify_with_llama_cpp(path, model, sp_tokenizer, max_new_tokens=20, n_threads=1)
    # q8_0 rounds each weight, and llama.cpp each activation, to 1/254 of its 32-block's largest
    # magnitude (<= 0.4%); through two layers and the head that stays within a few per cent.
    assert report["max_rel_logit_error"] < 3e-2, report
    assert report["same_token_ids"] and int(report["greedy_tokens_agreeing"].split("/")[0]) >= 15, report


def test_a_chat_model_carries_its_template_and_end_of_turn_token(tmp_path, chat_tokenizer, tiny_data):
    from tinyllama.chat_template import CHAT_TEMPLATE, END_OF_TURN, end_of_turn_id
    from tinyllama.export_gguf import OLLAMA_CHAT_TEMPLATE
    from tinyllama.tokenizer import ensure_tokenizer

    tok = chat_tokenizer
    path = export_gguf(tiny_model(tok.vocab_size), tmp_path / "chat", tokenizer_path=tok.model_path)
    kv = fields(gguf.GGUFReader(path))
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert kv["tokenizer.ggml.eot_token_id"] == end_of_turn_id(tok)  # llama.cpp ends generation there
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_id
    lines = (path.parent / "Modelfile").read_text().splitlines()
    assert f'TEMPLATE """{OLLAMA_CHAT_TEMPLATE}"""' in lines
    assert 'PARAMETER stop "</s>"' in lines and f'PARAMETER stop "{END_OF_TURN}"' in lines
    data, tok_cfg = tiny_data
    plain = ensure_tokenizer(
        dataclasses.replace(tok_cfg, name="no_chat_pieces", user_defined_symbols=[]), data
    )
    base = export_gguf(tiny_model(plain.vocab_size), tmp_path / "base", tokenizer_path=plain.model_path)
    kv = fields(gguf.GGUFReader(base))
    assert "tokenizer.chat_template" not in kv and "tokenizer.ggml.eot_token_id" not in kv
