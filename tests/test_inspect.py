"""Course tooling: exact parameter counts of the real presets, the FLOP formula against a hand
count and against torch's own FLOP counter, the shape trace, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from tinyllama.cli import CONFIG_DIR, to_job
from tinyllama.errors import ConfigError
from tinyllama.inspection import (
    COMPONENTS,
    activation_bytes,
    build_meta_model,
    choose_trace_device,
    count_parameters,
    flops_per_token,
    memory_estimate,
    per_device_memory,
    trace_shapes,
    trace_tensors,
)
from tinyllama.model import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent

# Hand-countable shape: C=8, H=2 query heads of D=4, one KV head (MQA), I=12, V=10, L=2, tied.
#   per layer: attention q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, mlp 3*8*12 = 288, norms 2*8 = 16
#   total = embeddings 80 + 2 * (192 + 288 + 16) + final norm 8 = 1080 (tied head: 0 more)
HAND = dict(
    vocab_size=10,
    hidden_size=8,
    intermediate_size=12,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
    tie_word_embeddings=True,
)


def preset(name: str) -> LlamaConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_job(compose(config_name="inspect", overrides=[f"model={name}"])).model


@pytest.mark.parametrize(
    "name, total", [("llama2_7b", 6_738_415_616), ("llama3_8b", 8_030_261_248), ("qwen2_0_5b", 494_032_768)]
)
def test_exact_parameter_counts_of_real_presets(name, total):
    config = preset(name)
    counts = count_parameters(config)
    assert counts["total"] == total
    assert sum(counts[c] for c in COMPONENTS) == total
    assert counts["non_embedding"] == total - counts["embeddings"]
    model = build_meta_model(config)  # no storage: the count comes from shapes alone
    assert all(p.is_meta for p in model.parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert (counts["head"] == 0) == config.tie_word_embeddings


def test_component_counts_by_hand():
    counts = count_parameters(LlamaConfig(**HAND))
    assert counts == {
        "embeddings": 80,
        "attention": 2 * 192,
        "mlp": 2 * 288,
        "norms": 2 * 16 + 8,
        "head": 0,
        "total": 1080,
        "non_embedding": 1000,
    }
    untied = count_parameters(LlamaConfig(**{**HAND, "tie_word_embeddings": False}))
    assert untied["head"] == 80 and untied["total"] == 1160


def test_flops_formula_by_hand():
    T = 6
    f = flops_per_token(LlamaConfig(**HAND), T)
    n = 1000 + 80  # non-embedding + the tied head's V x C matmul
    attention = 4 * 2 * 2 * 4 * T  # 4 L H D T
    assert (f["n"], f["attention_forward"]) == (n, attention)
    assert f["forward"] == 2 * n + attention == 2544
    assert f["training"] == 6 * n + 3 * attention == 7632
    # Qwen2 window: layer 0 (< max_window_layers) sees T keys, layer 1 only 3.
    windowed = LlamaConfig(**{**HAND, "model_type": "qwen2", "sliding_window": 3, "max_window_layers": 1})
    assert flops_per_token(windowed, T)["attention_forward"] == 4 * 2 * 4 * (T + 3)


def test_flops_match_torch_flop_counter():
    """torch counts every matmul of a real eager forward + backward: 2 FLOPs per multiply-add,
    the full T x T attention scores, no norms (so subtract the norm weights from N)."""
    config = LlamaConfig(**{**HAND, "attn_implementation": "eager"})
    B, T = 2, 6
    model = LlamaForCausalLM(config)
    norms = count_parameters(config)["norms"]
    f = flops_per_token(config, T)
    assert flops_per_token(model, T) == f  # the train loop passes its built model
    with FlopCounterMode(display=False) as forward:
        logits = model(torch.randint(0, 10, (B, T))).logits
    assert forward.get_total_flops() == B * T * (f["forward"] - 2 * norms)
    with FlopCounterMode(display=False) as backward:
        logits.sum().backward()
    assert forward.get_total_flops() + backward.get_total_flops() == B * T * (f["training"] - 6 * norms)


def test_memory_estimate_bytes():
    est = memory_estimate(LlamaConfig(**HAND))
    assert est["parameters"] == 1080
    assert est["fp32"] == {"weights": 4320, "gradients": 4320, "adamw": 8640, "total": 17280}
    assert est["bf16"]["total"] == 17280 // 2


GQA = dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def test_trace_shapes_gqa():
    trace = trace_shapes(LlamaConfig(**GQA), seq_len=5, seed=0, batch_size=2)
    shapes = dict(trace)
    layer0 = [name.split(".", 3)[3] for name, _ in trace if name.startswith("model.layers.0.")]
    assert layer0 == [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_heads",
        "self_attn.k_heads",
        "self_attn.v_heads",
        "self_attn.q_rope",
        "self_attn.k_rope",
        "self_attn.k_repeat_kv",
        "self_attn.v_repeat_kv",
        "self_attn.attn_weights",
        "self_attn.attn_output_heads",
        "self_attn.attn_output",
        "self_attn.o_proj",
        "residual_attn",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "residual_mlp",
    ]
    assert [n for n, _ in trace[:2]] == ["input_ids", "model.embed_tokens"]
    assert [n for n, _ in trace[-2:]] == ["model.norm", "lm_head"]
    p = "model.layers.1.self_attn."
    assert shapes[p + "k_proj"] == (2, 5, 8)  # (B, T, KV*D)
    assert shapes[p + "k_heads"] == (2, 2, 5, 4)  # (B, KV, T, D): before repeat_kv
    assert shapes[p + "k_rope"] == (2, 2, 5, 4)
    assert shapes[p + "k_repeat_kv"] == (2, 4, 5, 4)  # (B, H, T, D): after
    assert shapes[p + "attn_weights"] == (2, 4, 5, 5)  # (B, H, T, T)
    assert shapes[p + "attn_output"] == (2, 5, 16)
    assert shapes["model.layers.1.mlp.up_proj"] == (2, 5, 24)
    assert shapes["lm_head"] == (2, 5, 50)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_replayed_attention_is_the_models(attn):
    """The inner steps are recomputed outside the model: they must reproduce what o_proj got."""
    model = LlamaForCausalLM(LlamaConfig(**{**GQA, "attn_implementation": attn})).eval()
    steps = dict(trace_tensors(model, torch.randint(0, 50, (2, 7))))
    for i in range(2):
        heads = steps[f"model.layers.{i}.self_attn.attn_output_heads"]  # (B, H, T, D)
        merged = heads.transpose(1, 2).reshape(2, 7, -1)
        torch.testing.assert_close(merged, steps[f"model.layers.{i}.self_attn.attn_output"])
        weights = steps[f"model.layers.{i}.self_attn.attn_weights"]
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
        assert weights[..., 0, 1:].abs().max() == 0  # causal: the first token sees only itself


def test_trace_length_is_seeded_and_meta_gives_same_shapes():
    config = LlamaConfig(**GQA)
    first = trace_shapes(config, seed=3)
    assert first == trace_shapes(config, seed=3)
    assert 4 <= first[0][1][1] <= 30
    assert trace_shapes(config, seed=3, device="meta") == first


def test_big_models_trace_on_meta_or_refuse():
    config = preset("llama2_7b")
    assert choose_trace_device(config, "auto") == "meta"
    with pytest.raises(ConfigError, match="inspect.trace_device=meta"):
        choose_trace_device(config, "cpu")
    assert choose_trace_device(LlamaConfig(**GQA), "auto") == "cpu"


def test_cli_prints_tree_counts_and_trace_without_writing_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "inspect_model.py"), "model=tiny", "inspect.trace=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("LlamaForCausalLM(\n  (model): LlamaModel(")
    assert "(self_attn): Attention(" in out and "(mlp): MLP(" in out
    assert f"parameters: {count_parameters(preset('tiny'))['total']:,}" in out
    assert "self_attn.k_repeat_kv" in out and "lm_head" in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no .hydra/, no log file


def test_per_device_memory_replicates_under_ddp_and_shards_under_fsdp_and_tp():
    config = LlamaConfig(**{**GQA, "num_key_value_heads": 2})
    est = memory_estimate(config)["fp32"]
    ddp = per_device_memory(config, "ddp", devices=4, seq_len=8)
    assert {k: ddp[k] for k in ("weights", "gradients", "adamw")} == {
        k: est[k] for k in ("weights", "gradients", "adamw")
    }  # each DDP device holds everything
    model = build_meta_model(config)
    fsdp = per_device_memory(config, "fsdp", devices=4, seq_len=8)
    assert fsdp["weights"] == 4 * sum(-(-p.numel() // 4) for p in model.parameters())  # fully_shard pads
    assert est["weights"] / 4 <= fsdp["weights"] < est["weights"] / 4 + 4 * 4 * len(list(model.parameters()))
    counts = count_parameters(config)
    tp = per_device_memory(config, "ddp", devices=2, tp=2, seq_len=8)
    assert tp["weights"] == 4 * (counts["norms"] + (counts["total"] - counts["norms"]) // 2)  # norms whole
    both = per_device_memory(config, "fsdp", devices=4, tp=2, seq_len=8)
    assert both["weights"] < tp["weights"] and both["activations"] == tp["activations"]


def test_activation_bytes_are_what_autograd_saves():
    """Counted on the meta device; the same count on a real CPU model (eager attention, whose
    saved tensors do not depend on the device's kernels) gives the same bytes, and they grow
    linearly with the batch (the RoPE tables and the mask are shared by its rows)."""
    config = LlamaConfig(**{**GQA, "attn_implementation": "eager"})
    meta = activation_bytes(config, seq_len=7, batch_size=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = {id(p) for p in model.parameters()}
    saved = {}

    def pack(t):
        if id(t) not in params:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    assert meta == sum(saved.values()) > 0
    one = activation_bytes(config, seq_len=7, batch_size=1)
    assert activation_bytes(config, seq_len=7, batch_size=4) - meta == 2 * (meta - one) > 0


def test_inspect_refuses_a_grid_that_does_not_fit():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides, message in (
            (["model=tiny", "inspect.tp=3"], "inspect.tp=3 does not divide model.num_attention_heads"),
            (["model=tiny", "inspect.devices=3", "inspect.tp=2"], "inspect.devices=3 is not a multiple"),
            (["model=tiny", "inspect.parallel=zero3"], "inspect.parallel='zero3': choose ddp or fsdp"),
        ):
            with pytest.raises(ConfigError, match=message):
                to_job(compose(config_name="inspect", overrides=overrides))
