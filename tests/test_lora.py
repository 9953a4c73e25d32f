"""LoRA adapters, checked against PEFT itself: our adapter folder loads in PEFT with our logits, a
PEFT-made adapter loads here with PEFT's logits; step 0 is the base, merging keeps the logits,
switching the adapters off gives the base back; bad settings and mismatched folders are refused.

Tolerances: everything runs in float32 (eps 1.2e-7). The LoRA path adds two small matmuls per
layer (inner widths <= 64) computed in the same order as PEFT's, so our logits and PEFT's differ
only by the rounding our model and transformers' already differ by (test_export.py bounds it at
1e-5 of the logits' scale); a merged weight W + s B A rounds once per weight where the unmerged
model rounds the two products separately: again ~1e-6 of the logits' scale, bounded at 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tinyllama.errors import CheckpointError, ConfigError
from tinyllama.export import export_hf
from tinyllama.lora import (
    PEFT_PREFIX,
    TARGETS,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
    saved_modules,
)
from tinyllama.model import LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

# q: 32 -> 32, k/v: 32 -> 16, o: 32 -> 32, gate/up: 32 -> 64, down: 64 -> 32; min width 16.
SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
QWEN2 = dict(model_type="qwen2", tie_word_embeddings=False)  # q/k/v with biases, an untied head


def tiny_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so differences show
        for p in model.parameters():
            p.mul_(10 if p.dim() > 1 else 1)
    return model


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Random B (zero at init), so the adapters change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


X = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))


def test_step_0_is_the_base_and_only_the_adapters_train():
    model = tiny_model()
    base = logits(model, X)
    names = apply_lora(model, rank=4, alpha=8, dropout=0.1, target_modules="all-linear")
    assert len(names) == 2 * len(TARGETS) and not any("lm_head" in n for n in names)
    assert torch.equal(logits(model, X), base)  # B = 0: the update is exactly zero
    assert not any(m.training for m in lora_modules(model).values())  # the eval() model's mode
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * len(names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.allclose(logits(model.eval(), X), base)  # the adapters learnt something
    with adapters_disabled(model):
        assert torch.equal(logits(model, X), base)  # the base, e.g. a DPO reference
    assert not torch.allclose(logits(model, X), base)  # switched back on after the block


@pytest.mark.parametrize(
    "overrides,targets",
    [({}, "all-linear"), ({}, ["q_proj", "v_proj"]), (QWEN2, "all-linear")],
    ids=["llama_all_linear", "llama_q_v", "qwen2_all_linear"],
)
def test_peft_loads_our_adapter_with_our_logits(tmp_path, overrides, targets):
    model = tiny_model(**overrides)
    base_folder = export_hf(model, tmp_path / "base")  # before LoRA: the plain base's weights
    apply_lora(model, rank=4, alpha=16, dropout=0.05, target_modules=targets)
    perturb(model)
    folder = save_peft_adapter(model, tmp_path / "adapter", str(base_folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    theirs = peft.PeftModel.from_pretrained(base, folder).eval()
    ours = logits(model, X)
    assert rel_err(ours, logits(theirs, X)) < 1e-5
    with theirs.disable_adapter():  # the adapters matter: PEFT's base is far from ours
        assert rel_err(ours, logits(theirs, X)) > 1e-2
    # PEFT's own saved keys are ours with its prefix, and hold our tensors.
    saved = peft.get_peft_model_state_dict(theirs)
    assert saved.keys() == {PEFT_PREFIX + k for k in lora_state_dict(model)}
    assert all(torch.equal(v, saved[PEFT_PREFIX + k]) for k, v in lora_state_dict(model).items())


@pytest.mark.parametrize("targets", ["all-linear", ["k_proj", "down_proj"]])
def test_an_adapter_made_by_peft_loads_here_with_its_logits(tmp_path, targets):
    model = tiny_model()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "base"))
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(theirs, config)
    perturb_peft = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=perturb_peft))
    theirs.save_pretrained(tmp_path / "adapter")
    names = load_peft_adapter(model, tmp_path / "adapter")
    assert len(names) == (14 if targets == "all-linear" else 4)
    assert rel_err(logits(model.eval(), X), logits(theirs.eval(), X)) < 1e-5


def perturb_saved(model: nn.Module, seed: int = 4) -> None:
    """Move the weights trained whole away from the base's, as training would, by about their
    own scale (tiny_model's weights are 10 x 0.02 init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in saved_modules(model).values():
            m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.2)


@pytest.mark.parametrize(
    "overrides,saved,written",
    [
        ({}, ["embed_tokens"], ["embed_tokens"]),
        ({}, ["lm_head"], ["embed_tokens"]),  # tied: the head is the embedding
        (QWEN2, ["embed_tokens", "lm_head"], ["embed_tokens", "lm_head"]),
        (QWEN2, ["lm_head"], ["lm_head"]),
    ],
    ids=["tied_embed", "tied_head", "untied_both", "untied_head"],
)
def test_modules_trained_whole_load_in_peft_with_our_logits(tmp_path, overrides, saved, written):
    model = tiny_model(**overrides)
    base_folder = export_hf(model, tmp_path / "base")
    base = logits(model, X)
    apply_lora(model, rank=4, alpha=16, target_modules="all-linear", modules_to_save=saved)
    tied = not overrides
    whole = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # a tied matrix once
    assert trainable == {k for k in lora_state_dict(model) if ".lora_" in k} | {whole[w] for w in written}
    perturb(model)
    perturb_saved(model)
    ours = logits(model, X)
    folder = save_peft_adapter(model, tmp_path / "adapter", str(base_folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["modules_to_save"] == written and config["ensure_weight_tying"] is tied
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_folder), folder
    ).eval()
    assert rel_err(ours, logits(theirs, X)) < 1e-5
    with adapters_disabled(model):  # the base's weights swapped back in: the reference model
        assert torch.equal(logits(model, X), base)
    assert torch.equal(logits(model, X), ours)
    fresh = tiny_model(**overrides)
    load_peft_adapter(fresh, folder)
    assert torch.equal(logits(fresh.eval(), X), ours)
    trained = {k: v.clone() for k, v in model.state_dict().items() if k in whole.values()}
    merge_lora(model)  # the merged logits: test_merging_keeps_the_logits_and_leaves_plain_linears
    assert not saved_modules(model) and not lora_modules(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_a_tied_embedding_saved_twice_must_agree(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    apply_lora(model, rank=2, alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    folder = save_peft_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    head = PEFT_PREFIX + "lm_head.weight"
    save_file({**tensors, head: tensors[head] + 1}, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from .*embed_tokens.weight"):
        load_peft_adapter(tiny_model(), folder)


def test_merging_keeps_the_logits_and_leaves_plain_linears(tmp_path):
    model = tiny_model()
    plain_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    perturb(model)
    unmerged = logits(model, X)
    assert merge_lora(model) is model
    assert not lora_modules(model)
    assert all(
        type(model.get_submodule(f"model.layers.0.{p}")) is nn.Linear
        for p in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert set(model.state_dict()) == plain_keys  # exports see a plain Llama
    assert rel_err(logits(model, X), unmerged) < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "merged"))
    assert rel_err(logits(hf, X), unmerged) < 1e-5


def test_a_merged_lora_linear_refuses_a_second_merge_and_a_forward():
    layer = LoRALinear(nn.Linear(8, 4), rank=2, alpha=2)
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer(torch.zeros(1, 8))


def test_save_then_load_on_a_fresh_base_gives_the_same_logits(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=3, alpha=6, dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"])
    perturb(model)
    save_peft_adapter(model, tmp_path / "adapter", "local/base")
    fresh = tiny_model()
    names = load_peft_adapter(fresh, tmp_path / "adapter")
    assert names == list(lora_modules(model))
    assert torch.equal(logits(fresh.eval(), X), logits(model.eval(), X))
    layer = lora_modules(fresh)[names[0]]
    assert (layer.rank, layer.alpha, layer.dropout) == (3, 6, 0.1)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj", "up_proj"]
    assert config["base_model_name_or_path"] == "local/base"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(target_modules=["q_proj", "qkv"]), r"\['qkv'\] match no module.*q_proj, k_proj"),
        (dict(target_modules=["lm_head"]), "lm_head is never a target"),
        (dict(rank=0), "rank=0 must be a positive integer"),
        (
            dict(rank=17),
            r"rank=17 is above min\(in, out\) = 16 of model.layers.0.self_attn.k_proj.*rank <= 16",
        ),
        (dict(alpha=0), "alpha=0 must be > 0"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(modules_to_save=["norm"]), r"\['norm'\] cannot be trained whole: choose among embed_tokens"),
    ],
    ids=["unknown_target", "lm_head", "rank_0", "rank_too_large", "alpha_0", "dropout_1", "save_norm"],
)
def test_bad_settings_are_refused_and_the_model_is_untouched(kwargs, message):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        apply_lora(model, **{**dict(rank=4, alpha=8, dropout=0.0, target_modules="all-linear"), **kwargs})
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


def test_an_adapter_for_another_base_is_refused_naming_the_key_and_shapes(tmp_path):
    other = tiny_model(hidden_size=48)  # another width: every A is (r, 48)
    apply_lora(other, rank=4, alpha=8, target_modules=["q_proj"])
    folder = save_peft_adapter(other, tmp_path / "adapter")
    files = sorted(p.name for p in tmp_path.rglob("*"))
    model = tiny_model()
    keys = set(model.state_dict())
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(4, 48\) but this model needs \(4, 32\)"):
        load_peft_adapter(model, folder)
    assert not lora_modules(model) and set(model.state_dict()) == keys
    assert sorted(p.name for p in tmp_path.rglob("*")) == files  # nothing written


def test_unsupported_or_broken_adapter_folders_are_refused(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4, target_modules=["v_proj"])
    folder = save_peft_adapter(model, tmp_path / "adapter")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=True"):
        load_peft_adapter(tiny_model(), folder)
    config_path.write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(CheckpointError, match=r"\['c_attn'\] match no module"):
        load_peft_adapter(tiny_model(), folder)
    config_path.write_text(json.dumps({**config, "r": 3}))  # the tensors are rank 2
    with pytest.raises(CheckpointError, match=r"has shape \(2, 32\) but this model needs \(3, 32\)"):
        load_peft_adapter(tiny_model(), folder)
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_peft_adapter(tiny_model(), tmp_path)


def test_saving_refuses_a_model_without_adapters_settings_that_disagree_and_an_existing_folder(tmp_path):
    model = tiny_model()
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_peft_adapter(model, tmp_path / "a")
    apply_lora(model, rank=2, alpha=4, target_modules="all-linear")
    with pytest.raises(ConfigError, match=r"rank=8 \(the adapters have 2\)"):
        save_peft_adapter(model, tmp_path / "a", rank=8, alpha=4)
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary folder
    save_peft_adapter(model, tmp_path / "a", rank=2, alpha=4, dropout=0.0, target_modules="all-linear")
    with pytest.raises(ConfigError, match="already exists"):
        save_peft_adapter(model, tmp_path / "a")
