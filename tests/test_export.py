"""Hugging Face export and import, checked against transformers itself: equal logits, equal
greedy text, equal token ids; transformers-made checkpoints import; bad folders are refused."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.export import export_hf, import_hf
from tinyllama.generate import generate
from tinyllama.model import LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
VARIANTS = {
    "llama_tied": dict(),
    "llama_bias_linear_rope": dict(
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "qwen2_sliding_window": dict(
        model_type="qwen2", sliding_window=8, max_window_layers=1, tie_word_embeddings=False, rope_theta=1e6
    ),
}


def tiny_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy text is not degenerate
        for p in model.parameters():
            p.mul_(10 if p.dim() > 1 else 1)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers_with_equal_logits_and_greedy_text(tmp_path, variant):
    ours = tiny_model(**VARIANTS[variant])
    folder = export_hf(ours, tmp_path / "hf", generation={"do_sample": True, "temperature": 0.8})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = "Qwen2ForCausalLM" if "qwen2" in variant else "LlamaForCausalLM"
    assert type(theirs).__name__ == expected
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))  # past the window/context
    with torch.no_grad():
        assert rel_err(ours(x).logits, theirs(x).logits) < 1e-5
    prompt = x[:1, :6]
    ref = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(generate(ours, prompt, max_new_tokens=12, temperature=0.0), ref)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["temperature"] == 0.8


def test_exported_tokenizer_gives_our_ids_in_transformers(tmp_path, tiny_data):
    from tinyllama.data import iter_documents
    from tinyllama.tokenizer import ensure_tokenizer

    data, tok_cfg = tiny_data
    tok = ensure_tokenizer(tok_cfg, data)
    folder = export_hf(tiny_model(vocab_size=tok.vocab_size), tmp_path / "hf", tokenizer_path=tok.model_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = list(iter_documents(data, "val"))[:20]
    texts += ["  two  spaces, a tab\there, digits 2024, café ñ 中文 😀\n", "ends with space "]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok("Once").input_ids == tok.encode("Once", bos=True)  # <s> first, as Llama's tokenizer
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_import_of_a_transformers_checkpoint_round_trips(tmp_path, arch):
    hf_shape = dict(SHAPE, vocab_size=80)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            **hf_shape,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 4.0,
                "rope_theta": 5e5,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
        theirs = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(
            **hf_shape,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=True,
        )
        theirs = transformers.Qwen2ForCausalLM(cfg)
    theirs.eval().save_pretrained(tmp_path / "hf")
    config, state = import_hf(tmp_path / "hf")
    ours = LlamaForCausalLM(config).eval()
    ours.load_state_dict(state)
    x = torch.randint(0, 80, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours(x).logits, theirs(x).logits) < 1e-5
    # Export of the imported model reproduces the original config where both define it.
    export_hf(ours, tmp_path / "again")
    again = transformers.AutoConfig.from_pretrained(tmp_path / "again")
    assert again.model_type == arch and again.rope_parameters == cfg.rope_parameters


def test_unsupported_or_broken_hf_folders_are_refused(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(CheckpointError, match="model_type='gpt2'.*only Llama"):
        import_hf(folder)
    with pytest.raises(CheckpointError, match="no config.json"):
        import_hf(tmp_path / "missing")
    export_hf(tiny_model(), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 10)  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_hf(tmp_path / "hf")


def test_export_never_writes_over_an_existing_folder(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export_hf(tiny_model(), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export_hf(tiny_model(), out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left behind
    umask = os.umask(0o022)  # the folder gets the umask's permissions, not a private 0700
    try:
        export_hf(tiny_model(), out, overwrite=True)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755


def test_export_stage_writes_a_verified_folder_from_a_run(saved_run, capsys):
    from pathlib import Path

    from tinyllama.export import run_export

    tiny_job = saved_run[0]
    tiny_job.sample.temperature, tiny_job.sample.top_k = 0.7, 40
    out = run_export(tiny_job)
    assert out == Path(tiny_job.run.dir) / "hf"
    assert "same_greedy_text True, same_token_ids True" in capsys.readouterr().out
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] and gen["temperature"] == 0.7 and gen["top_k"] == 40
    tiny_job.export.out_dir, tiny_job.export.dtype = str(out.parent / "hf_bf16"), "bfloat16"
    bf16 = run_export(tiny_job)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(bf16)
    assert theirs.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="already exists"):
        run_export(tiny_job)


def test_a_chat_model_exports_its_template_and_stops_at_end_of_turn_in_transformers(tmp_path, chat_tokenizer):
    pytest.importorskip("jinja2")
    from tinyllama.chat_template import CHAT_TEMPLATE, encode_conversation, end_of_turn_id

    tok = chat_tokenizer
    end = end_of_turn_id(tok)
    taught = [{"role": "user", "content": "Who is the story about?"}, {"role": "assistant", "content": "Mia"}]
    ours = tiny_model(vocab_size=tok.vocab_size)
    ids, labels = encode_conversation(tok, taught)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    for _ in range(60):  # until its greedy reply is "Mia<|end|>"
        optimizer.zero_grad()
        ours(torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
        optimizer.step()
    ours.eval()
    folder = export_hf(ours, tmp_path / "hf", tokenizer_path=tok.model_path)
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id, end]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    system = [{"role": "system", "content": "You answer in a few words."}]
    for messages in (taught[:1], system + taught + [{"role": "user", "content": "And Tom, café?"}]):
        got = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        got = got["input_ids"] if hasattr(got, "keys") else got
        assert list(got) == tok.apply_chat_template(messages, add_generation_prompt=True)
    prompt = torch.tensor([tok.apply_chat_template(taught[:1], add_generation_prompt=True)])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert out[0, prompt.shape[1] :].tolist() == tok.encode("Mia") + [end]  # stopped at <|end|>
    assert torch.equal(out, generate(ours, prompt, 20, temperature=0.0, eos_token_id=end))


def test_a_base_model_exports_no_chat_template(tmp_path, tiny_data):
    from tinyllama.tokenizer import ensure_tokenizer

    plain = dataclasses.replace(tiny_data[1], name="no_chat_pieces", user_defined_symbols=[])
    tok = ensure_tokenizer(plain, tiny_data[0])
    folder = export_hf(tiny_model(vocab_size=tok.vocab_size), tmp_path / "hf", tokenizer_path=tok.model_path)
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
