"""The Llama / Qwen2 decoder, with Hugging Face's class, module and parameter names.

The architecture only: this package imports nothing of tinyllama but its errors, and knows no
optimizer, checkpoint or logger. Class map (file: what it holds, Hugging Face's name where it
differs):

    config.py     LlamaConfig            shapes and switches, validated on construction
    norm.py       RMSNorm                (LlamaRMSNorm)
    rotary.py     RotaryEmbedding, rotate_half, apply_rotary_pos_emb, compute_inv_freq,
                  ROPE_TYPES             the RoPE types and the rope_scaling keys each needs
    masks.py      build_attention_mask   causal + padding + sliding-window mask
    attention.py  Attention, repeat_kv, eager_attention   (LlamaAttention / Qwen2Attention)
    mlp.py        MLP, ACTIVATIONS       (LlamaMLP: SwiGLU); the accepted hidden_act values
    cache.py      KVCache                preallocated key/value cache (DynamicCache/StaticCache)
    modeling.py   DecoderLayer, LlamaModel, ModelParts; num_parameters (on every model)
    heads.py      LlamaForCausalLM (+ flops_per_token), LlamaForSequenceClassification,
                  causal_lm_loss         the one causal-LM cross-entropy (and its chunked form)

    model = LlamaForCausalLM(LlamaConfig(...))
    out = model(input_ids, labels=input_ids)          # out.logits (B, T, V), out.loss
    out = model(input_ids, logits_to_keep=1)          # out.logits (B, 1, V): the last position
    model.model.gradient_checkpointing = True         # trade compute for activation memory
    model.chunked_loss = True                         # loss without the (B, T, V) logits
    model.num_parameters(), model.flops_per_token(seq_len=256)["training"]

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
from tinyllama.model.heads import (
    CausalLMOutput,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    SequenceClassifierOutput,
    causal_lm_loss,
    chunked_causal_lm_loss,
)
from tinyllama.model.mlp import ACTIVATIONS, MLP
from tinyllama.model.modeling import BaseModelOutput, DecoderLayer, LlamaModel, ModelParts
from tinyllama.model.norm import RMSNorm
from tinyllama.model.rotary import (
    ROPE_TYPES,
    RotaryEmbedding,
    apply_rotary_pos_emb,
    compute_inv_freq,
    rotate_half,
)

__all__ = [
    "ACTIVATIONS",
    "ROPE_TYPES",
    "Attention",
    "BaseModelOutput",
    "CausalLMOutput",
    "DecoderLayer",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "MLP",
    "ModelParts",
    "RMSNorm",
    "RotaryEmbedding",
    "SequenceClassifierOutput",
    "apply_rotary_pos_emb",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "compute_inv_freq",
    "eager_attention",
    "repeat_kv",
    "rotate_half",
]
