"""Reference solution of lesson 6."""

from typing import Dict

import torch
from torch import nn

from tinyllama.model import MLP, Attention, LlamaConfig, LlamaForCausalLM, RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None):
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values
        )
        return h + self.mlp(self.post_attention_layernorm(h))


def count_parameters(config: LlamaConfig) -> Dict[str, int]:
    c, v, i, n = config.hidden_size, config.vocab_size, config.intermediate_size, config.num_hidden_layers
    d, h, kv = config.resolved_head_dim, config.num_attention_heads, config.resolved_num_key_value_heads
    attn = 2 * c * h * d + 2 * c * kv * d
    if config.model_type == "qwen2":
        attn += h * d + 2 * kv * d
    elif config.attention_bias:
        attn += h * d + 2 * kv * d + c
    mlp = 3 * c * i + (2 * i + c if config.mlp_bias else 0)
    counts = {
        "embeddings": v * c,
        "attention": n * attn,
        "mlp": n * mlp,
        "norms": (2 * n + 1) * c,
        "head": 0 if config.tie_word_embeddings else v * c,
    }
    counts["total"] = sum(counts.values())
    return counts


def meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(config)
