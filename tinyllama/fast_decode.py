"""The inference path of `generate`: the model's math with its weights packed for decoding.

Decoding feeds one token per row, so every projection is a matrix-vector product and a step is
bound by reading the weights from memory, plus a fixed cost per PyTorch op. `FastDecoder`
cuts both, the way llama2.c's run.c sits beside its model.py:

- weights stored input-major, `(C_in, C_out)` contiguous, applied as `x @ W_t`: for a single
  row, BLAS then streams the matrix in the order it lies in memory; the layout of `nn.Linear`,
  `(C_out, C_in)`, made this CPU's float32 gemv read ~2-3x slower (BENCHMARKS.md, generation);
- q/k/v in one matrix and gate/up in one matrix: 4 products per layer instead of 7;
- RoPE applied to the q and k heads in one go, attention by `scaled_dot_product_attention`
  reading the grouped k/v heads directly (no repeat_kv copy).

The result equals the model's forward up to float rounding (tests/test_fast_decode.py). The
packed copy is built once per model and rebuilt when its weights change (a parameter's
version counter moves, e.g. after an optimizer step). It handles the standard parts only:
`FastDecoder.supports(model)` is False for a model built with other attention, MLP or rotary
`ModelParts` (a custom norm runs as it is) or with sliding-window layers, and `generate` then
runs the model itself.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tinyllama.model import KVCache
from tinyllama.model.attention import Attention, repeat_kv
from tinyllama.model.masks import build_attention_mask
from tinyllama.model.mlp import MLP
from tinyllama.model.rotary import RotaryEmbedding, rotate_half

# torch >= 2.5 lets sdpa read H_kv key/value heads for H query heads without repeat_kv's copy.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


def _t(linear: nn.Linear) -> torch.Tensor:
    """(C_out, C_in) weight -> (C_in, C_out) contiguous copy."""
    return linear.weight.detach().t().contiguous()


def _cat_bias(*linears: nn.Linear) -> Optional[torch.Tensor]:
    """The fused projections' bias; q/k/v (and gate/up) always share one bias setting."""
    return None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])


class _PackedLayer:
    """One decoder layer's weights in decoding layout."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        # Norms and the activation have no matrix to pack: the model's own modules run as they are.
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = torch.cat([_t(attn.q_proj), _t(attn.k_proj), _t(attn.v_proj)], dim=1)  # (C, (H + 2 H_kv) D)
        self.qkv_bias = _cat_bias(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o, self.o_bias = _t(attn.o_proj), attn.o_proj.bias
        self.gate_up = torch.cat([_t(mlp.gate_proj), _t(mlp.up_proj)], dim=1)  # (C, 2 I)
        self.gate_up_bias = _cat_bias(mlp.gate_proj, mlp.up_proj)
        self.down, self.down_bias = _t(mlp.down_proj), mlp.down_proj.bias
        self.act_fn = mlp.act_fn


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (..., C_in) @ weight_t (C_in, C_out) + bias -> (..., C_out)."""
    out = x @ weight_t
    return out if bias is None else out + bias


class FastDecoder:
    """Runs a `LlamaForCausalLM`'s backbone and head on new tokens with a KVCache, returning
    the logits of the last position: `decoder(input_ids, attention_mask, position_ids, cache)`."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True if the model is built from the standard parts this path re-implements."""
        backbone = getattr(model, "model", None)
        if backbone is None or not hasattr(model, "lm_head") or model.lm_head.bias is not None:
            return False
        config = backbone.config
        if model.training and config.attention_dropout > 0:  # this path never drops out
            return False
        # Norms are called as the model's own modules, so any norm part works; the parts whose
        # weights are packed (attention, MLP) and the rotary tables must be the standard ones.
        return (type(backbone.rotary_emb) is RotaryEmbedding
                and not any(config.uses_sliding_window(i) for i in range(config.num_hidden_layers))
                and all(type(layer.self_attn) is Attention and type(layer.mlp) is MLP for layer in backbone.layers))

    @classmethod
    def for_model(cls, model: nn.Module) -> "FastDecoder":
        """The model's packed decoder, built on first use and whenever its weights changed."""
        decoder = model.__dict__.get("_fast_decoder")
        if decoder is None or decoder.version != _weights_version(model):
            decoder = cls(model)
            model.__dict__["_fast_decoder"] = decoder  # not a submodule: never in state_dict
        return decoder

    @torch.no_grad()
    def __init__(self, model: nn.Module) -> None:
        backbone = model.model
        config = backbone.config
        self.version = _weights_version(model)  # of the weights packed here
        self.embed_tokens = backbone.embed_tokens.weight.detach()  # (V, C)
        self.rotary_emb = backbone.rotary_emb
        self.layers: List[_PackedLayer] = [_PackedLayer(layer) for layer in backbone.layers]
        self.norm = backbone.norm
        self.lm_head = _t(model.lm_head)  # (C, V)
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.resolved_num_key_value_heads
        self.scaling = self.head_dim ** -0.5

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 position_ids: Optional[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """input_ids (B, T) -> float32 logits of the last position (B, V), appending to `cache`.

        attention_mask (B, past + T) of 1/0 for padded batches, else None; position_ids (B, T),
        or None for past, past + 1, ... (as `LlamaModel.forward`)."""
        B, T = input_ids.shape
        past = cache.get_seq_length()
        max_position = None
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
            max_position = past + T
        x = F.embedding(input_ids, self.embed_tokens)  # (B, T, C)
        cos, sin = self.rotary_emb(x, position_ids, max_position)  # (B|1, T, D)
        cos, sin = cos[:, None], sin[:, None]  # (B|1, 1, T, D): one table for every head
        mask = build_attention_mask(attention_mask, T, past, input_ids.device, allow_implicit_causal=True)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer.input_layernorm(x), layer, i, cos, sin, mask, cache)
            h = layer.post_attention_layernorm(x)
            gate, up = _linear(h, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            x = x + _linear(layer.act_fn(gate) * up, layer.down, layer.down_bias)
        last = self.norm(x[:, -1])  # (B, C): the head sees one position
        return (last @ self.lm_head).float()

    def _attention(self, h: torch.Tensor, layer: _PackedLayer, layer_idx: int, cos: torch.Tensor,
                   sin: torch.Tensor, mask: Optional[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """Normed hidden states (B, T, C) -> attention output after o_proj (B, T, C)."""
        B, T, _ = h.shape
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        qkv = _linear(h, layer.qkv, layer.qkv_bias).view(B, T, H + 2 * H_kv, D).transpose(1, 2)  # (B, H+2H_kv, T, D)
        qk, v = qkv[:, : H + H_kv], qkv[:, H + H_kv:]
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on query and key heads at once
        q, k = qk[:, :H], qk[:, H:]
        k, v = cache.update(k, v, layer_idx)  # (B, H_kv, S, D)
        if H_kv != H and not _SDPA_GQA:
            k, v = repeat_kv(k, H // H_kv), repeat_kv(v, H // H_kv)
        gqa = {"enable_gqa": True} if H_kv != H and _SDPA_GQA else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             scale=self.scaling, **gqa)
        return _linear(out.transpose(1, 2).reshape(B, T, H * D), layer.o, layer.o_bias)


def _weights_version(model: nn.Module) -> Tuple:
    """Changes whenever a parameter is replaced or modified in place (optimizer steps,
    load_state_dict, .to()): the packed copy is stale then."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
