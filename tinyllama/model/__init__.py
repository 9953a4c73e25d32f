"""The Llama / Qwen2 decoder, with Hugging Face's class, module and parameter names.

Class map (file: what it holds, Hugging Face's name where it differs):

    config.py     LlamaConfig            shapes and switches, validated on construction
    norm.py       RMSNorm                (LlamaRMSNorm)
    rotary.py     RotaryEmbedding, rotate_half, apply_rotary_pos_emb, compute_inv_freq
    masks.py      build_attention_mask   causal + padding + sliding-window mask
    attention.py  Attention, repeat_kv, eager_attention   (LlamaAttention / Qwen2Attention)
    mlp.py        MLP                    (LlamaMLP: SwiGLU)
    cache.py      KVCache                preallocated key/value cache (DynamicCache/StaticCache)
    modeling.py   DecoderLayer, LlamaModel, ModelParts
    heads.py      LlamaForCausalLM, LlamaForSequenceClassification, causal_lm_loss

    model = LlamaForCausalLM(LlamaConfig(...))
    out = model(input_ids, labels=input_ids)          # out.logits (B, T, V), out.loss
    model.model.gradient_checkpointing = True         # trade compute for activation memory

Replacing a part (course exercises): pass your own classes in `ModelParts`; every layer is then
built from them, and the parity tests tell you whether yours still matches transformers.

    from tinyllama.model import ModelParts
    model = LlamaForCausalLM(cfg, parts=ModelParts(norm=MyRMSNorm, attention=MyAttention))

    norm:      cls(hidden_size, eps=...);  forward(x (B, T, C)) -> (B, T, C)
    rotary:    cls(config);  forward(x, position_ids (B, T), max_position=None) -> cos, sin (B, T, D)
    attention: cls(config, layer_idx);  forward(hidden_states (B, T, C), (cos, sin),
               attention_mask (B|1, 1, T, S) bool or None = plain causal, past_key_values) -> (B, T, C)
    mlp:       cls(config);  forward(x (B, T, C)) -> (B, T, C)
"""
from tinyllama.model.attention import Attention, eager_attention, repeat_kv
from tinyllama.model.cache import KVCache
from tinyllama.model.config import LlamaConfig
from tinyllama.model.heads import (CausalLMOutput, LlamaForCausalLM, LlamaForSequenceClassification,
                                   SequenceClassifierOutput, causal_lm_loss, chunked_causal_lm_loss)
from tinyllama.model.mlp import MLP
from tinyllama.model.modeling import BaseModelOutput, DecoderLayer, LlamaModel, ModelParts
from tinyllama.model.norm import RMSNorm
from tinyllama.model.rotary import RotaryEmbedding, apply_rotary_pos_emb, compute_inv_freq, rotate_half

__all__ = [
    "Attention", "BaseModelOutput", "CausalLMOutput", "DecoderLayer", "KVCache", "LlamaConfig",
    "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel", "MLP", "ModelParts", "RMSNorm",
    "RotaryEmbedding", "SequenceClassifierOutput", "apply_rotary_pos_emb", "causal_lm_loss",
    "chunked_causal_lm_loss", "compute_inv_freq", "eager_attention", "repeat_kv", "rotate_half",
]
