"""The decoding step of `generate` on CPU: the model's math in NumPy, weights packed for decoding.

`generate` runs the prompt through the model itself (a prefill is compute-bound: torch's GEMMs
and attention kernels are the right tools), then feeds each new token here. One token per row
makes every projection a matrix-vector product, so a step is bound by reading the weights from
memory plus a fixed cost per op. `FastDecoder` cuts both, the way llama2.c's run.c sits beside
its model.py (the measurements behind each point: BENCHMARKS.md, generation):

- the ~25 small ops per layer (norms, RoPE, cache writes, attention, residuals) run in NumPy,
  whose cost per call on arrays this small is a fraction of a PyTorch op's (no dispatcher,
  autograd or version bookkeeping);
- weights stored input-major, `(C_in, C_out)` contiguous, applied as `x @ W_t`: for a single
  row, BLAS then streams the matrix in the order it lies in memory, clearly faster than
  nn.Linear's `(C_out, C_in)` layout on the CPUs measured, in torch and NumPy alike;
- q/k/v in one matrix and gate/up in one matrix: 4 products per layer instead of 7;
- RoPE applied to the q and k heads in one go; grouped query heads read their shared k/v head
  directly (no repeat_kv copy).

The seam with the model: this path reads the model's modules and parameters and never changes
them; it writes keys and values only through `KVCache.update_arrays`, into the same buffers the
model's forward fills, so the two take turns on one cache. Its logits equal the model's forward
up to float rounding (tests/test_fast_decode.py: that equality is this module's contract).

The packed copy is kept beside the model (not on it) and reused while the model still holds
exactly what was packed: `FastDecoder.matches` compares every packed array with the parameter it
came from (once per generate call; about one decoding step's worth of reading) and the module
tree's identity, so any change (an optimizer step, load_state_dict, a write through `.data`, a
swapped module) makes `for_model` pack afresh. It handles float32 models on the CPU built from
the standard parts: `FastDecoder.unsupported(model)` says why not on other devices and dtypes,
with other attention, MLP or rotary `ModelParts`, or with sliding-window layers, and `generate`
then runs the model itself (it logs which path decodes at DEBUG level, logger tinyllama.generate).
Norms and activations other than RMSNorm and SiLU run as the model's own modules, on zero-copy
tensor views.

Threads: NumPy's BLAS (OpenBLAS) uses every core unless OPENBLAS_NUM_THREADS says otherwise,
as torch does unless torch.set_num_threads does.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from tinyllama.config import LORA_TARGETS
from tinyllama.model import KVCache
from tinyllama.model.attention import Attention
from tinyllama.model.mlp import MLP
from tinyllama.model.norm import RMSNorm
from tinyllama.model.rotary import RotaryEmbedding

Array = np.ndarray
# (parameter name, the array that holds its values here, laid out as the parameter): what
# FastDecoder.matches compares with the model.
Sources = List[Tuple[str, Array]]

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


def _numpy_fn(name: str, module: nn.Module, sources: Sources) -> Callable[[Array], Array]:
    """A norm or activation module as a function of arrays: NumPy math for RMSNorm and SiLU
    (RMSNorm's gain read through a zero-copy view), the module itself for anything else."""
    if type(module) is RMSNorm:
        weight = module.weight.detach().numpy()
        sources.append((f"{name}.weight", weight))
        return functools.partial(rms_norm, weight=weight, eps=module.variance_epsilon)
    if type(module) is nn.SiLU:
        return silu
    return functools.partial(_through_module, module)


def _fused(named: Sequence[Tuple[str, nn.Linear]], sources: Sources) -> Tuple[Array, Optional[Array]]:
    """The weights of several projections side by side, input-major (C_in, sum of C_out), and
    their joint bias (or None; q/k/v and gate/up always share one bias setting)."""
    # One copy, into a C-contiguous array (concatenating transposed views alone would keep their
    # column-major order, nn.Linear's layout in memory, which is what packing is for to undo).
    out_features = sum(linear.out_features for _, linear in named)
    weight = np.empty((named[0][1].in_features, out_features), dtype=np.float32)
    np.concatenate([linear.weight.detach().numpy().T for _, linear in named], axis=1, out=weight)
    bias = None
    if named[0][1].bias is not None:
        bias = np.concatenate([linear.bias.detach().numpy() for _, linear in named])
    start = 0
    for name, linear in named:
        end = start + linear.out_features
        sources.append((f"{name}.weight", weight[:, start:end].T))  # (C_out, C_in), as the parameter
        if bias is not None:
            sources.append((f"{name}.bias", bias[start:end]))
        start = end
    return weight, bias


def _linear(x: Array, weight_t: Array, bias: Optional[Array]) -> Array:
    """x (N, C_in) @ weight_t (C_in, C_out) + bias -> (N, C_out)."""
    out = x @ weight_t
    return out if bias is None else out + bias


class _PackedLayer:
    """One decoder layer's weights in decoding layout; `prefix` is its parameter-name prefix."""

    def __init__(self, layer: nn.Module, prefix: str, sources: Sources) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_layernorm = _numpy_fn(f"{prefix}.input_layernorm", layer.input_layernorm, sources)
        self.post_attention_layernorm = _numpy_fn(
            f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm, sources
        )
        a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
        self.qkv, self.qkv_bias = _fused(
            [(f"{a}.{p}_proj", getattr(attn, f"{p}_proj")) for p in "qkv"], sources
        )  # (C, (H + 2 H_kv) D)
        self.o, self.o_bias = _fused([(f"{a}.o_proj", attn.o_proj)], sources)
        self.gate_up, self.gate_up_bias = _fused(
            [(f"{m}.{p}_proj", getattr(mlp, f"{p}_proj")) for p in ("gate", "up")], sources
        )  # (C, 2 I)
        self.down, self.down_bias = _fused([(f"{m}.down_proj", mlp.down_proj)], sources)
        self.act_fn = _numpy_fn(f"{m}.act_fn", mlp.act_fn, sources)
        self.intermediate_size = self.down.shape[0]


class FastDecoder:
    """Runs a `LlamaForCausalLM`'s backbone and head on one new token per row with a KVCache,
    returning its logits: `decoder(input_ids, attention_mask, position_ids, cache)`."""

    @staticmethod
    def unsupported(model: nn.Module) -> Optional[str]:
        """Why this path cannot decode `model`, or None if it can: it re-implements float32 CPU
        models built from the standard attention, MLP and rotary parts, without sliding windows."""
        backbone = getattr(model, "model", None)
        if backbone is None or not hasattr(model, "lm_head") or model.lm_head.bias is not None:
            return "not a LlamaForCausalLM"
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
            return "weights not float32 on the CPU"
        config = backbone.config
        if model.training and config.attention_dropout > 0:
            return "attention dropout in training mode"  # this path never drops out
        # Norms and activations run as the model's own modules if they are not the standard ones;
        # the parts whose weights are packed (attention, MLP) and the rotary tables must be.
        layers = backbone.layers
        if not (
            type(backbone.rotary_emb) is RotaryEmbedding
            and all(type(layer.self_attn) is Attention and type(layer.mlp) is MLP for layer in layers)
        ):
            return "custom attention, MLP or rotary parts"
        if any(
            type(getattr(part, name, None)) is not nn.Linear
            for layer in layers
            for part in (layer.self_attn, layer.mlp)
            for name in LORA_TARGETS  # the decoder's linear layers
            if hasattr(part, name)
        ):
            return "projections that are not plain nn.Linear (LoRA adapters: merge them first)"
        if any(config.uses_sliding_window(i) for i in range(config.num_hidden_layers)):
            return "sliding-window layers"
        return None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """True if the model is a float32 CPU model built from the parts this path re-implements."""
        return cls.unsupported(model) is None

    @classmethod
    def for_model(cls, model: nn.Module) -> "FastDecoder":
        """The model's packed decoder, built on first use and again whenever the model no longer
        holds what was packed (see `matches`)."""
        decoder = _DECODERS.get(model)
        if decoder is None or not decoder.matches(model):
            decoder = _DECODERS[model] = cls(model)
        return decoder

    @torch.no_grad()
    def __init__(self, model: nn.Module) -> None:
        backbone = model.model
        self.config = config = backbone.config
        self._sources: Sources = []
        self.embed_tokens = backbone.embed_tokens.weight.detach().numpy()  # (V, C), shared, not copied
        self._sources.append(("model.embed_tokens.weight", self.embed_tokens))
        self.rotary_emb = backbone.rotary_emb
        self.layers: List[_PackedLayer] = [
            _PackedLayer(layer, f"model.layers.{i}", self._sources) for i, layer in enumerate(backbone.layers)
        ]
        self.norm = _numpy_fn("model.norm", backbone.norm, self._sources)
        self.lm_head, _ = _fused([("lm_head", model.lm_head)], self._sources)  # (C, V)
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.resolved_num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self._identity = _module_identity(model)

    @torch.no_grad()
    def matches(self, model: nn.Module) -> bool:
        """True while `model` holds exactly what was packed here: the same modules (a swapped
        norm or activation runs as itself) and the same parameters with equal values, compared
        array by array (a view that still shares the parameter's memory needs no comparison).
        Exact and made of public calls only, so every kind of write is seen; it costs about one
        read of the weights."""
        if _module_identity(model) != self._identity:
            return False
        params = dict(model.named_parameters(remove_duplicate=False))  # a tied head under both names
        for name, packed in self._sources:
            p = params.get(name)
            if p is None or p.device.type != "cpu" or p.dtype != torch.float32 or p.shape != packed.shape:
                return False
            current = p.detach().numpy()
            shared = current.ctypes.data == packed.ctypes.data and current.strides == packed.strides
            if not (shared or np.array_equal(current, packed)):
                return False
        return True

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        cache: KVCache,
    ) -> torch.Tensor:
        """input_ids (B, 1) -> float32 logits (B, V), appending to `cache` (B, H_kv, past, D) per
        layer, which the model's forward filled with the prompt.

        attention_mask (B, past + 1) of 1/0 for padded batches, else None; position_ids (B, 1),
        or None for `past` (as `LlamaModel.forward`)."""
        B, T = input_ids.shape
        past = cache.get_seq_length()
        if T != 1 or past == 0:
            raise ValueError(
                f"FastDecoder continues a prompt one token per row; got {T} tokens and a cache "
                f"of {past}: run the prompt through the model with this cache first"
            )
        x = self.embed_tokens[input_ids.numpy()[:, 0]]  # (B, C)
        positions = np.full((1, 1), past) if position_ids is None else position_ids.numpy()  # (B|1, 1)
        cos, sin = self._cos_sin(positions)  # (B|1, 1, D): one table for every head
        mask = None  # one new token may see the whole cache, unless some of it is padding
        if attention_mask is not None:
            # dtype-min, not -inf, as masks.to_additive: a row that sees nothing stays finite
            mask = np.where(
                attention_mask.numpy()[:, None, None, :] > 0, np.float32(0), np.finfo(np.float32).min
            )  # (B, 1, 1, S): broadcast over H_kv and G
        # Silent on float overflow, like torch (silu's exp(-x) reaching inf is even meant): a
        # diverged model shows in its logits, not as NumPy warnings.
        with np.errstate(all="ignore"):
            for i, layer in enumerate(self.layers):
                x = x + self._attention(layer.input_layernorm(x), layer, i, cos, sin, mask, cache)
                gate_up = _linear(layer.post_attention_layernorm(x), layer.gate_up, layer.gate_up_bias)
                gate, up = gate_up[:, : layer.intermediate_size], gate_up[:, layer.intermediate_size :]
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

    def _attention(
        self,
        h: Array,
        layer: _PackedLayer,
        layer_idx: int,
        cos: Array,
        sin: Array,
        mask: Optional[Array],
        cache: KVCache,
    ) -> Array:
        """Normed hidden states (B, C) -> attention output after o_proj (B, C)."""
        B = h.shape[0]
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        qkv = _linear(h, layer.qkv, layer.qkv_bias).reshape(B, H + 2 * H_kv, D)
        qk = qkv[:, : H + H_kv] * cos + rotate_half(qkv[:, : H + H_kv]) * sin  # RoPE on q and k heads at once
        # One new position per row: (B, H_kv, D) -> (B, H_kv, 1, D); back come all (B, H_kv, S, D).
        keys, values = cache.update_arrays(qk[:, H:, None], qkv[:, H + H_kv :, None], layer_idx)
        # Query heads grouped by the k/v head they share, (B, H_kv, G, D): one product per k/v head.
        q = qk[:, :H].reshape(B, H_kv, H // H_kv, D)
        scores = (q @ keys.swapaxes(-1, -2)) * self.scaling  # (B, H_kv, G, S)
        if mask is not None:
            scores = scores + mask
        weights = np.exp(scores - scores.max(-1, keepdims=True))  # softmax over the keys
        weights /= weights.sum(-1, keepdims=True)
        out = (weights @ values).reshape(B, H * D)  # (B, H_kv, G, D) -> heads side by side
        return _linear(out, layer.o, layer.o_bias)


def _module_identity(model: nn.Module) -> Tuple:
    """Which module objects, under which names, make up the model, and its parameter names: a
    swapped module or an added parameter (a bias set on a projection) changes it."""
    return (
        tuple((name, id(module)) for name, module in model.named_modules()),
        tuple(name for name, _ in model.named_parameters(remove_duplicate=False)),
    )
