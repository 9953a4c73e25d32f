"""Lesson 6: the decoder layer and the full model.   Read course/en/06-decoder.md.

Reference: tinyllama/model/modeling.py (DecoderLayer, LlamaModel), tinyllama/model/heads.py
(LlamaForCausalLM), tinyllama/inspection.py (count_parameters, build_meta_model).  Grade with:

    python -m tinyllama.course check 6
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from tinyllama.model import MLP, Attention, KVCache, LlamaConfig, LlamaForCausalLM, RMSNorm


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, Hugging Face's names: self_attn, mlp, input_layernorm,
    post_attention_layernorm (use the reference Attention, MLP and RMSNorm classes)."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        # TODO: self.self_attn = Attention(config, layer_idx), self.mlp = MLP(config), and two
        # RMSNorm(config.hidden_size, eps=config.rms_norm_eps): input_layernorm (before
        # attention) and post_attention_layernorm (before the MLP).
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """hidden_states (B, T, C) -> (B, T, C).

        Two residual branches; each normalises its input, the residual stream itself is never
        normalised: h = x + attn(norm1(x), ...); out = h + mlp(norm2(h)).
        Call self.self_attn(normed, position_embeddings, attention_mask, past_key_values).
        """
        raise NotImplementedError


def count_parameters(config: LlamaConfig) -> Dict[str, int]:
    """Parameter counts from the config alone (no model), by component:

    {"embeddings": ..., "attention": ..., "mlp": ..., "norms": ..., "head": ..., "total": ...}

    embeddings: V x C. attention, per layer: q_proj C x H*D, k_proj and v_proj C x KV*D, o_proj
    H*D x C, plus biases where the config has them (Llama: attention_bias on all four; Qwen2,
    model_type="qwen2": on q, k, v only). mlp, per layer: 3 matrices C x I (+ biases if mlp_bias).
    norms: two (C,) gains per layer and the final one. head: V x C, or 0 when
    tie_word_embeddings (it shares the embedding's tensor). D = config.resolved_head_dim,
    KV = config.resolved_num_key_value_heads.
    """
    raise NotImplementedError


def meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    """Build LlamaForCausalLM(config) on the meta device: shapes and dtypes, no storage, so even
    Llama-2-7B takes a second and no memory (hint: `with torch.device("meta"):`)."""
    raise NotImplementedError
