"""Reading a local Hugging Face Llama or Qwen2 folder: config.json into our LlamaConfig, the
safetensors weights into a state_dict with our key names (which are Hugging Face's).

`init_from=hf:<folder>`, the DPO reference and LoRA adapters whose base is a Hugging Face folder
read it here; tinyllama.export writes such folders (and re-exports `import_hf`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
from safetensors.torch import load_file

from tinyllama.errors import CheckpointError
from tinyllama.model import LlamaForCausalLM
from tinyllama.model.config import LlamaConfig
from tinyllama.model.heads import restore_tied_head
from tinyllama.model.rotary import ROPE_TYPES  # transformers' yarn, longrope, ... have no counterpart here

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(hf: Dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from a transformers config.json dict (Llama or Qwen2; 4.x or 5.x keys)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
        raise CheckpointError(
            f"model_type={model_type!r} ({arch}) is not supported: only Llama "
            f"(model_type=llama) and Qwen2 (model_type=qwen2) checkpoints import"
        )
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"RoPE type {rope_type!r} is not supported (choose among {', '.join(ROPE_TYPES)})"
        )
    rope.pop("type", None)
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    bos = hf.get("bos_token_id")
    sliding = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, hf["hidden_size"] // heads) else head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        attention_bias=hf.get("attention_bias", False) if model_type == "llama" else False,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        mlp_bias=hf.get("mlp_bias", False),
        model_type=model_type,
        sliding_window=sliding,
        max_window_layers=hf.get("max_window_layers", 0) if sliding else 0,
        # transformers' default is untied: a config.json without the key means separate weights.
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=bos if bos is not None else (eos if eos is not None else 1),
        eos_token_id=eos if eos is not None else 2,
    )


def import_hf(folder: Union[str, Path]) -> Tuple[LlamaConfig, Dict[str, torch.Tensor]]:
    """Read a local Hugging Face Llama/Qwen2 folder: (LlamaConfig, float32 state_dict with our keys).

    Weights must be safetensors (model.safetensors, or shards listed in model.safetensors.index.json).
    Raises CheckpointError naming the problem (missing files, another architecture, missing tensors).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cfg = config_from_hf(hf)
    except (ValueError, KeyError) as e:  # ConfigError is a ValueError: a config we cannot build
        raise CheckpointError(f"{folder / 'config.json'} cannot be imported: {e}") from e
    state = restore_tied_head(_read_safetensors(folder), cfg)
    with torch.device("meta"):  # only the key names are needed, not the memory
        expected = set(LlamaForCausalLM(cfg).state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: the weights do not match a {cfg.model_type} model of this "
            f"config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return cfg, {k: v.float() for k, v in state.items()}


def _read_safetensors(folder: Path) -> Dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{folder} holds no model.safetensors: only safetensors weights import "
            "(load the model in transformers and save_pretrained it to convert)"
        )
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except Exception as e:  # truncated or corrupt file
            raise CheckpointError(f"{folder / name} is corrupt: {type(e).__name__}: {e}") from e
    return state
