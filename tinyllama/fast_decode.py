"""The decoding step of `generate` on CPU: the model's math in NumPy, weights packed for decoding.

`generate` runs the prompt through the model itself (a prefill is compute-bound: torch's GEMMs
and attention kernels are the right tools), then feeds each new token here. One token per row
makes every projection a matrix-vector product, so a step is bound by reading the weights from
memory plus a fixed cost per op. `FastDecoder` cuts both, the way llama2.c's run.c sits beside
its model.py:

- the ~25 small ops per layer (norms, RoPE, cache writes, attention, residuals) run in NumPy,
  whose cost per call on arrays this small is a fraction of a PyTorch op's (no dispatcher,
  autograd or version bookkeeping): ~0.6 ms per token for 6 layers against ~1.8 ms in eager
  PyTorch, measured on a model too narrow for the products to count;
- weights stored input-major, `(C_in, C_out)` contiguous, applied as `x @ W_t`: for a single
  row, BLAS then streams the matrix in the order it lies in memory (`nn.Linear`'s layout made
  this CPU's float32 gemv 1.4-2x slower, in torch and NumPy alike, and NumPy's OpenBLAS streams
  ~30% faster than torch's MKL here; BENCHMARKS.md, generation);
- q/k/v in one matrix and gate/up in one matrix: 4 products per layer instead of 7;
- RoPE applied to the q and k heads in one go; grouped query heads read their shared k/v head
  directly (no repeat_kv copy); keys and values go into the model's own KVCache buffers through
  zero-copy views.

The logits equal the model's forward up to float rounding (tests/test_fast_decode.py). The
packed copy is built once per model and rebuilt when its weights change (a parameter's version
counter moves, e.g. after an optimizer step) or a module is swapped. It handles float32 models
on the CPU built from the standard parts: `FastDecoder.supports(model)` is False on other
devices and dtypes, with other attention, MLP or rotary `ModelParts`, or with sliding-window
layers, and `generate` then runs the model itself. Norms and activations other than RMSNorm and SiLU run as the model's own
modules, on zero-copy tensor views.

Threads: NumPy's BLAS (OpenBLAS) uses every core unless OPENBLAS_NUM_THREADS says otherwise,
as torch does unless torch.set_num_threads does.
"""
from __future__ import annotations

import functools
import weakref
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from tinyllama.model import KVCache
from tinyllama.model.attention import Attention
from tinyllama.model.mlp import MLP
from tinyllama.model.norm import RMSNorm
from tinyllama.model.rotary import RotaryEmbedding

Array = np.ndarray

# Each model's packed decoder, kept beside the model rather than on it: the model stays as it
# was (picklable, no second copy of its weights in torch.save), and the entry goes with it.
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, FastDecoder]" = weakref.WeakKeyDictionary()


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """(..., C) -> (..., C): RMSNorm's math (norm.py), in float32."""
    variance = np.square(x).sum(-1, keepdims=True) / x.shape[-1]
    return weight * (x / np.sqrt(variance + eps))


def silu(x: Array) -> Array:
    """x * sigmoid(x); exp(-x) overflowing to inf for very negative x gives the right limit, 0."""
    return x / (1.0 + np.exp(-x))


def rotate_half(x: Array) -> Array:
    """(..., D) -> (..., D): [x1, x2] -> [-x2, x1], as rotary.rotate_half."""
    half = x.shape[-1] // 2
    return np.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def _through_module(module: nn.Module, x: Array) -> Array:
    """Run a torch module on an array through zero-copy views."""
    return module(torch.from_numpy(x)).numpy()


def _numpy_fn(module: nn.Module) -> Callable[[Array], Array]:
    """A norm or activation module as a function of arrays: NumPy math for RMSNorm and SiLU,
    the module itself for anything else."""
    if type(module) is RMSNorm:
        return functools.partial(rms_norm, weight=module.weight.detach().numpy(), eps=module.variance_epsilon)
    if type(module) is nn.SiLU:
        return silu
    return functools.partial(_through_module, module)


def _t(linear: nn.Linear) -> Array:
    """(C_out, C_in) weight -> (C_in, C_out) contiguous copy."""
    return linear.weight.detach().t().contiguous().numpy()


def _bias(*linears: nn.Linear) -> Optional[Array]:
    """The (fused) projections' bias; q/k/v (and gate/up) always share one bias setting."""
    return None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears]).numpy()


def _linear(x: Array, weight_t: Array, bias: Optional[Array]) -> Array:
    """x (N, C_in) @ weight_t (C_in, C_out) + bias -> (N, C_out)."""
    out = x @ weight_t
    return out if bias is None else out + bias


class _PackedLayer:
    """One decoder layer's weights in decoding layout."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_layernorm = _numpy_fn(layer.input_layernorm)
        self.post_attention_layernorm = _numpy_fn(layer.post_attention_layernorm)
        self.qkv = np.concatenate([_t(attn.q_proj), _t(attn.k_proj), _t(attn.v_proj)], axis=1)  # (C, (H + 2 H_kv) D)
        self.qkv_bias = _bias(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o, self.o_bias = _t(attn.o_proj), _bias(attn.o_proj)
        self.gate_up = np.concatenate([_t(mlp.gate_proj), _t(mlp.up_proj)], axis=1)  # (C, 2 I)
        self.gate_up_bias = _bias(mlp.gate_proj, mlp.up_proj)
        self.down, self.down_bias = _t(mlp.down_proj), _bias(mlp.down_proj)
        self.act_fn = _numpy_fn(mlp.act_fn)
        self.intermediate_size = self.down.shape[0]


class FastDecoder:
    """Runs a `LlamaForCausalLM`'s backbone and head on one new token per row with a KVCache,
    returning its logits: `decoder(input_ids, attention_mask, position_ids, cache)`."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True if the model is a float32 CPU model built from the parts this path re-implements."""
        backbone = getattr(model, "model", None)
        if backbone is None or not hasattr(model, "lm_head") or model.lm_head.bias is not None:
            return False
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
            return False
        config = backbone.config
        if model.training and config.attention_dropout > 0:  # this path never drops out
            return False
        # Norms and activations run as the model's own modules if they are not the standard ones;
        # the parts whose weights are packed (attention, MLP) and the rotary tables must be.
        return (type(backbone.rotary_emb) is RotaryEmbedding
                and not any(config.uses_sliding_window(i) for i in range(config.num_hidden_layers))
                and all(type(layer.self_attn) is Attention and type(layer.mlp) is MLP for layer in backbone.layers))

    @classmethod
    def for_model(cls, model: nn.Module) -> "FastDecoder":
        """The model's packed decoder, built on first use and whenever its weights changed."""
        decoder = _DECODERS.get(model)
        if decoder is None or decoder.version != _weights_version(model):
            decoder = _DECODERS[model] = cls(model)
        return decoder

    @staticmethod
    def forget(model: nn.Module) -> None:
        """Drop the model's packed copy, after changing weights in a way the version check cannot
        see (writes through `param.data`)."""
        _DECODERS.pop(model, None)

    @torch.no_grad()
    def __init__(self, model: nn.Module) -> None:
        backbone = model.model
        self.config = config = backbone.config
        self.version = _weights_version(model)  # of the weights packed here
        self.embed_tokens = backbone.embed_tokens.weight.detach().numpy()  # (V, C), shared, not copied
        self.rotary_emb = backbone.rotary_emb
        self.layers: List[_PackedLayer] = [_PackedLayer(layer) for layer in backbone.layers]
        self.norm = _numpy_fn(backbone.norm)
        self.lm_head = _t(model.lm_head)  # (C, V)
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.resolved_num_key_value_heads
        self.scaling = self.head_dim ** -0.5

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 position_ids: Optional[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """input_ids (B, 1) -> float32 logits (B, V), appending to `cache` (B, H_kv, past, D) per
        layer, which the model's forward filled with the prompt.

        attention_mask (B, past + 1) of 1/0 for padded batches, else None; position_ids (B, 1),
        or None for `past` (as `LlamaModel.forward`)."""
        B, T = input_ids.shape
        past = cache.get_seq_length()
        if T != 1 or past == 0:
            raise ValueError(f"FastDecoder continues a prompt one token per row; got {T} tokens and a cache "
                             f"of {past}: run the prompt through the model with this cache first")
        x = self.embed_tokens[input_ids.numpy()[:, 0]]  # (B, C)
        positions = np.full((1, 1), past) if position_ids is None else position_ids.numpy()  # (B|1, 1)
        cos, sin = self._cos_sin(positions)  # (B|1, 1, D): one table for every head
        mask = None  # one new token may see the whole cache, unless some of it is padding
        if attention_mask is not None:
            # dtype-min, not -inf, as masks.to_additive: a row that sees nothing stays finite
            mask = np.where(attention_mask.numpy()[:, None, None, :] > 0, np.float32(0),
                            np.finfo(np.float32).min)  # (B, 1, 1, S): broadcast over H_kv and G
        # Silent on float overflow, like torch (silu's exp(-x) reaching inf is even meant): a
        # diverged model shows in its logits, not as NumPy warnings.
        with np.errstate(all="ignore"):
            for i, layer in enumerate(self.layers):
                x = x + self._attention(layer.input_layernorm(x), layer, i, cos, sin, mask, cache)
                gate_up = _linear(layer.post_attention_layernorm(x), layer.gate_up, layer.gate_up_bias)
                gate, up = gate_up[:, : layer.intermediate_size], gate_up[:, layer.intermediate_size:]
                x = x + _linear(layer.act_fn(gate) * up, layer.down, layer.down_bias)
            return torch.from_numpy(self.norm(x) @ self.lm_head)

    def _cos_sin(self, positions: Array) -> Tuple[Array, Array]:
        """RoPE's cos/sin (B|1, 1, D) at positions (B|1, 1): rows of the rotary module's own
        tables, or, where it has none (dynamic scaling past the context), what it computes."""
        max_position = int(positions.max()) + 1
        tables = self.rotary_emb.tables(max_position)
        if tables is None:
            like = torch.empty(0)  # forward reads only the dtype (float32) and the device of x
            cos, sin = self.rotary_emb(like, torch.from_numpy(positions), max_position)
            return cos.numpy(), sin.numpy()
        cos, sin = tables
        return cos.numpy()[positions], sin.numpy()[positions]

    def _attention(self, h: Array, layer: _PackedLayer, layer_idx: int, cos: Array, sin: Array,
                   mask: Optional[Array], cache: KVCache) -> Array:
        """Normed hidden states (B, C) -> attention output after o_proj (B, C)."""
        B = h.shape[0]
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        qkv = _linear(h, layer.qkv, layer.qkv_bias).reshape(B, H + 2 * H_kv, D)
        qk = qkv[:, : H + H_kv] * cos + rotate_half(qkv[:, : H + H_kv]) * sin  # RoPE on q and k heads at once
        keys, values = self._cache_append(cache, layer_idx, qk[:, H:], qkv[:, H + H_kv:])  # (B, H_kv, S, D)
        # Query heads grouped by the k/v head they share, (B, H_kv, G, D): one product per k/v head.
        q = qk[:, :H].reshape(B, H_kv, H // H_kv, D)
        scores = (q @ keys.swapaxes(-1, -2)) * self.scaling  # (B, H_kv, G, S)
        if mask is not None:
            scores = scores + mask
        weights = np.exp(scores - scores.max(-1, keepdims=True))  # softmax over the keys
        weights /= weights.sum(-1, keepdims=True)
        out = (weights @ values).reshape(B, H * D)  # (B, H_kv, G, D) -> heads side by side
        return _linear(out, layer.o, layer.o_bias)

    def _cache_append(self, cache: KVCache, layer_idx: int, key: Array, value: Array) -> Tuple[Array, Array]:
        """Write one position's key/value (B, H_kv, D) into the cache's buffers through zero-copy
        NumPy views, as KVCache.update does for tensors; return the filled part (B, H_kv, S, D)."""
        start = cache.get_seq_length(layer_idx)
        cache.reserve(layer_idx, start + 1, torch.float32, torch.device("cpu"))
        keys, values = cache.keys[layer_idx].numpy(), cache.values[layer_idx].numpy()
        keys[:, :, start], values[:, :, start] = key, value
        cache.lengths[layer_idx] = start + 1
        return keys[:, :, : start + 1], values[:, :, : start + 1]


def _weights_version(model: nn.Module) -> Tuple:
    """Changes whenever a parameter is replaced or modified in place (optimizer steps,
    load_state_dict, .to()) or a module is swapped for another: the packed copy is stale then.
    Writes through `param.data` do not move the version counter: see `FastDecoder.forget`."""
    return (tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters()),
            tuple(map(id, model.modules())))
