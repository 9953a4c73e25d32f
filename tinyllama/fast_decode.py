"""The decoding step of `generate` on CPU: the model's math on weights packed for decoding.

`generate` runs the prompt through the model itself (a prefill is compute-bound: torch's GEMMs
and attention kernels are the right tools), then feeds each new token here. One token per row
makes every projection a matrix-vector product (or, for a batch, a product with a few rows), so
a step is bound by reading the weights from memory plus a fixed cost per op. `FastDecoder` cuts
both, the way llama2.c's run.c sits beside its model.py (the measurements behind each point:
BENCHMARKS.md, generation and the decoding engine). It has two steps with one contract:

The compiled step (backend "compiled", the default wherever it builds): tinyllama/kernels/
decode.c, compiled on first use for the machine that runs it, does every layer and the head of a
step in one call, its threads (torch's OpenMP pool) sharing each matrix product by panels of
output columns and the attention by heads. Matrices are packed in its panel layout
(`_Panels`): q/k/v in one matrix, gate/up interleaved so that SiLU is applied as the products
finish; int8 weights are widened to float32 inside the product (only the weights are rounded).
Each output is one chain of multiply-adds in a fixed order, so a row's logits are the same bits
whatever rows share its batch. It knows RMSNorm and SiLU; `FastDecoder.compiled_unsupported`
says when it does not apply (another norm or activation, no compiler: tinyllama/kernels).

The NumPy step (backend "numpy": the fallback, and the readable version of the same math):

- the ~20 small ops per layer (norms, RoPE, cache writes, attention, residuals) run in NumPy,
  whose cost per call on arrays this small is a fraction of a PyTorch op's (no dispatcher,
  autograd or version bookkeeping); one row's RMSNorm is a dot product and a Python float;
- weights stored input-major, `(C_in, C_out)`, applied as `x @ W_t`: for a single row the
  product then streams the matrix in the order it lies in memory, clearly faster than
  nn.Linear's `(C_out, C_in)` layout on the CPUs measured, in torch and NumPy alike. The matrix
  is cut into column blocks, `(P, C_in, C_out / P)`, that `torch.bmm` shares among torch's
  threads (BLAS runs a matrix-vector product on one thread);
- q/k/v in one matrix and gate/up in one matrix: 4 products per layer instead of 7;
- RoPE on the q and k heads in one go, `q * cos + swap(q) * sin` where swapping a head's halves
  is a view and the sign of rotate_half sits in the sin table; grouped query heads read their
  shared k/v head directly (no repeat_kv copy).

`weights="int8"` (sample.weights) swaps the float32 matrices for int8 weight-only ones, one
scale per output channel (in the NumPy step multiplied by torch's `_weight_int8pack_mm`): a
quarter of the bytes to read per token. Everything else stays float32.

The seam with the model: this path reads the model's modules and parameters and never changes
them; it writes keys and values only where KVCache hands it room (`update_arrays` for the
NumPy step, `append_arrays` for the compiled one, which writes the new position itself), into
the same buffers the model's forward fills, so the two take turns on one cache. Its logits
equal the model's forward up to float rounding (tests/test_fast_decode.py: that equality is
this module's contract).

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

Threads: the compiled step uses torch.get_num_threads() threads, from any thread. In the NumPy
step, on the main thread the matrix products follow torch.set_num_threads (the column blocks
are packed for the thread count, two per thread, and packed afresh when it changes); off it (the
server's engine thread), where each of torch's OpenMP regions costs about a thread start, they
run in NumPy's BLAS, as do the small attention products.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
import weakref
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from tinyllama import kernels
from tinyllama.config import LORA_TARGETS, SAMPLE_WEIGHTS
from tinyllama.model import KVCache
from tinyllama.model.attention import Attention
from tinyllama.model.mlp import MLP
from tinyllama.model.norm import RMSNorm
from tinyllama.model.rotary import RotaryEmbedding

Array = np.ndarray

# Each model's packed decoders (one per weight format), kept beside the model rather than on it:
# the model stays as it was (picklable, no second copy of its weights in torch.save), and the
# entries go with it.
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, Dict[str, FastDecoder]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Source:
    """Where a packed array came from: the parameter `name` (of `shape`), its rows `rows` (all
    of them if None), held here as `packed` (a view laid out as those rows, or for whole strips
    as (strips, vector, C_in), those rows in groups of `vector`) or, for a quantized copy, as the
    CRC-32 of their float32 bytes: what FastDecoder.matches compares."""

    name: str
    shape: Tuple[int, ...]
    rows: Optional[slice]
    packed: Union[Array, int]


Sources = List[_Source]


def _runs(columns: Array, vector: int) -> List[Tuple[int, int, int, int]]:
    """A projection's rows as runs that lie side by side in the packed strips, for comparing
    each run as one view: (lo, hi, strip, column) for rows [lo, hi) starting at that column of
    that strip. `columns`: each row's column in the joint matrix. A run is either part of one
    strip or whole strips one after another."""
    breaks = np.flatnonzero((np.diff(columns) != 1) | (columns[1:] % vector == 0)) + 1
    runs: List[Tuple[int, int, int, int]] = []
    for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(columns)]):
        strip, t = divmod(int(columns[lo]), vector)
        if runs:
            lo0, hi0, strip0, t0 = runs[-1]
            whole = t == 0 and hi - lo == vector and t0 == 0 and (hi0 - lo0) % vector == 0
            if whole and strip0 + (hi0 - lo0) // vector == strip:
                runs[-1] = (lo0, hi, strip0, 0)
                continue
        runs.append((lo, hi, strip, t))
    return runs


BACKENDS = ("auto", "compiled", "numpy")  # FastDecoder's step: see its __init__
_SHARED_MATRIX = 2**17  # weights from which a float32 product is shared among torch's threads
_INT8_BLOCK = 16  # the int8 kernel's input width must be a multiple of this


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """(B, C) -> (B, C): RMSNorm's math (norm.py), in float32. One row, decoding's common case,
    takes its mean square as one dot product and the scale as a Python float (3 array ops
    instead of 7)."""
    if x.shape[0] == 1:
        return x * (weight * (1.0 / math.sqrt(float(np.dot(x[0], x[0])) / x.shape[-1] + eps)))
    variance = np.add.reduce(np.square(x), axis=-1, keepdims=True) / x.shape[-1]
    return weight * (x / np.sqrt(variance + eps))


def silu(x: Array) -> Array:
    """x * sigmoid(x); exp(-x) overflowing to inf for very negative x gives the right limit, 0."""
    return x / (1.0 + np.exp(-x))


def _through_module(module: nn.Module, x: Array) -> Array:
    """Run a torch module on an array through zero-copy views (no graph: its parameters may
    require grad, and the caller's grad mode is the caller's)."""
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _numpy_fn(name: str, module: nn.Module, sources: Sources) -> Callable[[Array], Array]:
    """A norm or activation module as a function of arrays: NumPy math for RMSNorm and SiLU
    (RMSNorm's gain read through a zero-copy view), the module itself for anything else."""
    if type(module) is RMSNorm:
        weight = module.weight.detach().numpy()
        sources.append(_Source(f"{name}.weight", weight.shape, None, weight))
        return functools.partial(rms_norm, weight=weight, eps=module.variance_epsilon)
    if type(module) is nn.SiLU:
        return silu
    return functools.partial(_through_module, module)


def _quantize(
    weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(C_out, C_in) float32 -> int8 weights and one scale per output channel (in
    `scale_dtype`), symmetric: scale = max |w| / 127. The weights are rounded against the scale
    as stored, so that its own rounding is absorbed; a zero row gets the smallest normal scale,
    not 0 (the clamp also catches a scale that rounded down)."""
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    qweight = (weight / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return qweight, scale


class _Matrix:
    """Several projections applied side by side to one input, x (B, C_in) -> (B, sum of C_out),
    plus their joint bias (q/k/v and gate/up always share one bias setting).

    float32: the matrix is stored input-major in `parts` column blocks, (P, C_in, C_out / P)
    contiguous. At batch 1 a product streams the whole matrix for one row of output, so it is
    bound by memory reads; BLAS runs such a matrix-vector product on one thread, while torch.bmm
    over the P blocks shares them among torch's threads. With one thread NumPy multiplies the
    blocks (a stacked matmul, as fast as one product there); so it does off the main thread
    (the server's engine), where each of torch's OpenMP regions costs about a thread start
    (decoding measured 2.6x slower there), and for matrices too small to share.

    int8: torch's int8 weight-only kernel (`_weight_int8pack_mm`: (C_out, C_in) int8 rows, one
    bfloat16 scale per output channel, symmetric, scale = max |w| / 127). It takes its input in
    bfloat16 and returns bfloat16; the result joins the float32 residual stream. The kernel reads
    C_in in blocks of 16: for other widths (torch 2.13 returns garbage or crashes there) the
    matrix gets zero columns and the input zeros up to the next multiple of 16."""

    def __init__(
        self, named: Sequence[Tuple[str, nn.Linear]], weights: str, sources: Sources, parts: int
    ) -> None:
        self.in_features = named[0][1].in_features
        self.out_features = sum(linear.out_features for _, linear in named)
        self.bias = None
        # Where each projection's outputs sit among the joint ones: [lo, hi).
        starts = np.cumsum([0] + [linear.out_features for _, linear in named]).tolist()
        if named[0][1].bias is not None:
            self.bias = np.concatenate([linear.bias.detach().numpy() for _, linear in named])
            for (name, linear), lo, hi in zip(named, starts, starts[1:]):
                sources.append(_Source(f"{name}.bias", (linear.out_features,), None, self.bias[lo:hi]))
        self.int8 = weights == "int8"
        if self.int8:
            weight = torch.cat([linear.weight.detach() for _, linear in named])  # (C_out, C_in)
            qweight, scale = _quantize(weight, torch.bfloat16)  # the kernel's scale dtype
            self.padded_in = -(-self.in_features // _INT8_BLOCK) * _INT8_BLOCK
            if self.padded_in != self.in_features:
                qweight = torch.nn.functional.pad(qweight, (0, self.padded_in - self.in_features))
            self.qweight, self.scale = qweight, scale
            for name, linear in named:
                current = np.ascontiguousarray(linear.weight.detach().numpy())
                sources.append(
                    _Source(f"{name}.weight", tuple(linear.weight.shape), None, zlib.crc32(current))
                )
            return
        if self.in_features * self.out_features < _SHARED_MATRIX:
            parts = 1  # too small for threads to pay their start and finish
        P = max(p for p in range(1, parts + 1) if self.out_features % p == 0)
        n = self.out_features // P
        # One copy, into C-contiguous blocks (the parameters are (C_out, C_in): transposed here).
        self.parts = np.empty((P, self.in_features, n), dtype=np.float32)
        for (name, linear), lo, hi in zip(named, starts, starts[1:]):
            shape = tuple(linear.weight.shape)
            weight_t = linear.weight.detach().numpy().T  # (C_in, C_out) view
            for p in range(P):
                a, b = max(lo, p * n), min(hi, (p + 1) * n)
                if a < b:
                    self.parts[p, :, a - p * n : b - p * n] = weight_t[:, a - lo : b - lo]
                    # (rows of the parameter, the same values here laid out as those rows)
                    sources.append(
                        _Source(
                            f"{name}.weight",
                            shape,
                            slice(a - lo, b - lo),
                            self.parts[p, :, a - p * n : b - p * n].T,
                        )
                    )
        self.parts_t = torch.from_numpy(self.parts)

    def __call__(self, x: Array, shared: bool) -> Array:
        """x (B, C_in) float32 -> (B, C_out) float32; `shared`: torch's pool may run it (see
        `threads_shared`)."""
        B = x.shape[0]
        if self.int8:
            if self.padded_in == self.in_features:
                x_bf16 = torch.from_numpy(x).bfloat16()
            else:
                x_bf16 = torch.zeros(B, self.padded_in, dtype=torch.bfloat16)
                x_bf16[:, : self.in_features] = torch.from_numpy(x)
            out = torch._weight_int8pack_mm(x_bf16, self.qweight, self.scale).float().numpy()
        else:
            P = self.parts.shape[0]
            if shared and (P > 1 or B > 1):
                # Products of several rows go through torch's pool too: NumPy's BLAS would wake
                # threads of its own that fight torch's for the cores (a 16-row step ran 10x
                # slower); a one-row product of a small matrix stays in NumPy on one thread.
                x_t = torch.from_numpy(x).expand(P, B, self.in_features)
                blocks = torch.bmm(x_t, self.parts_t).numpy()
            else:
                blocks = np.matmul(x, self.parts)  # (P, B, C_out / P)
            # Blocks side by side: at batch 1 (or with one block) their memory is the output.
            out = blocks.reshape(B, -1) if B == 1 or P == 1 else blocks.transpose(1, 0, 2).reshape(B, -1)
        return out if self.bias is None else out + self.bias

    @property
    def nbytes(self) -> int:
        """Bytes of the packed matrix (and its scales, if quantized)."""
        if self.int8:
            return self.qweight.numel() + 2 * self.scale.numel()
        return self.parts.nbytes


class _Panels:
    """Several projections side by side in the compiled step's layout (tinyllama/kernels/
    decode.c): the joint matrix's output columns in panels of `tile`, the last one padded with
    zero columns, each panel stored as strips of `vector` columns for all inputs: (P * tile /
    vector, C_in, vector), every strip read start to end.

    `glu`: the two projections (gate, up) interleaved panel by panel, 2q holding gate's columns
    [q tile, (q + 1) tile) and 2q + 1 up's same columns, so that one thread computes both halves
    of silu(gate) * up. int8: the same layout in int8, with one float32 scale per column (float32
    arithmetic: only the weights are rounded)."""

    def __init__(
        self,
        named: Sequence[Tuple[str, nn.Linear]],
        weights: str,
        sources: Sources,
        tile: int,
        vector: int,
        glu: bool = False,
    ) -> None:
        linears = [linear for _, linear in named]
        self.in_features = linears[0].in_features
        self.glu = glu
        if glu:
            width = linears[0].out_features  # gate and up: one width
            padded = -(-width // tile) * tile
            chunk = np.arange(width)
            columns = [(chunk // tile) * 2 * tile + chunk % tile + half * tile for half in (0, 1)]
            self.out_features, total = width, 2 * padded
        else:
            starts = np.cumsum([0] + [linear.out_features for linear in linears])
            columns = [np.arange(lo, hi) for lo, hi in zip(starts, starts[1:])]
            self.out_features = int(starts[-1])
            total = -(-self.out_features // tile) * tile
        self.panels = total // tile
        joint = torch.zeros(total, self.in_features)  # the joint matrix, (columns, C_in)
        bias = np.zeros(total, dtype=np.float32) if linears[0].bias is not None else None
        for linear, cols in zip(linears, columns):
            joint[torch.from_numpy(cols)] = linear.weight.detach()
            if bias is not None:
                bias[cols] = linear.bias.detach().numpy()
        self.int8 = weights == "int8"
        self.scale = None
        if self.int8:
            qweight, scale = _quantize(joint)
            self.scale = scale.numpy()
            joint = qweight
        # (columns, C_in) -> (strips, C_in, vector): one copy into contiguous strips
        self.w = np.ascontiguousarray(
            joint.numpy().reshape(total // vector, vector, self.in_features).transpose(0, 2, 1)
        )
        self.bias = bias
        for (name, linear), cols in zip(named, columns):
            shape = tuple(linear.weight.shape)
            if self.int8:
                current = np.ascontiguousarray(linear.weight.detach().numpy())
                sources.append(_Source(f"{name}.weight", shape, None, zlib.crc32(current)))
            for lo, hi, strip, t in _runs(cols, vector):
                rows = slice(lo, hi)
                if not self.int8:
                    if t == 0 and (hi - lo) % vector == 0:  # whole strips, one after another
                        packed = self.w[strip : strip + (hi - lo) // vector].transpose(0, 2, 1)
                    else:  # part of one strip
                        packed = self.w[strip, :, t : t + hi - lo].T
                    sources.append(_Source(f"{name}.weight", shape, rows, packed))
                if bias is not None:
                    sources.append(
                        _Source(
                            f"{name}.bias", (shape[0],), rows, bias[int(cols[lo]) : int(cols[lo]) + hi - lo]
                        )
                    )

    def struct(self) -> "kernels.Matrix":
        """This matrix as decode.c's tl_matrix (pointing into arrays this object keeps)."""
        return kernels.Matrix(
            w=self.w.ctypes.data,
            scale=None if self.scale is None else self.scale.ctypes.data,
            bias=None if self.bias is None else self.bias.ctypes.data,
            k=self.in_features,
            panels=self.panels,
            n=self.out_features,
            glu=int(self.glu),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the packed matrix (and its scales, if quantized)."""
        return self.w.nbytes + (0 if self.scale is None else self.scale.nbytes)


class _KernelModel:
    """The whole model as decode.c's tl_model: packed matrices, the norm gains (the model's own
    memory, read through views) and the sizes; `step` runs one decoding step through it."""

    def __init__(self, model: nn.Module, weights: str, sources: Sources, library: ctypes.CDLL) -> None:
        backbone, config = model.model, model.model.config
        tile, vector = library.tl_tile(), library.tl_vector()
        self.library = library
        self.matrices: List[_Panels] = []
        self.keep: List[Array] = []  # every array a pointer below points into
        layers = (kernels.Layer * config.num_hidden_layers)()
        for i, layer in enumerate(backbone.layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _Panels(
                [(f"{a}.{p}_proj", getattr(attn, f"{p}_proj")) for p in "qkv"], weights, sources, tile, vector
            )
            o_proj = _Panels([(f"{a}.o_proj", attn.o_proj)], weights, sources, tile, vector)
            gate_up = _Panels(
                [(f"{m}.{p}_proj", getattr(mlp, f"{p}_proj")) for p in ("gate", "up")],
                weights,
                sources,
                tile,
                vector,
                glu=True,
            )
            down_proj = _Panels([(f"{m}.down_proj", mlp.down_proj)], weights, sources, tile, vector)
            self.matrices += [qkv, o_proj, gate_up, down_proj]
            layers[i] = kernels.Layer(
                input_layernorm=self._gain(
                    f"model.layers.{i}.input_layernorm", layer.input_layernorm, sources
                ),
                post_attention_layernorm=self._gain(
                    f"model.layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, sources
                ),
                qkv=qkv.struct(),
                o_proj=o_proj.struct(),
                gate_up=gate_up.struct(),
                down_proj=down_proj.struct(),
            )
        lm_head = _Panels([("lm_head", model.lm_head)], weights, sources, tile, vector)
        self.matrices.append(lm_head)
        self.layers = layers  # kept: self.model points into it
        self.model = kernels.Model(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.resolved_num_key_value_heads,
            head_dim=config.resolved_head_dim,
            vocab=config.vocab_size,
            eps=backbone.norm.variance_epsilon,
            scaling=config.resolved_head_dim**-0.5,
            layer=layers,
            norm=self._gain("model.norm", backbone.norm, sources),
            lm_head=lm_head.struct(),
        )
        self.step = kernels.Step()
        self.work = np.empty(0, dtype=np.float32)
        self._pointers: Tuple = ()
        self._lock = threading.Lock()

    def _gain(self, name: str, norm: nn.Module, sources: Sources) -> int:
        weight = norm.weight.detach().numpy()  # the model's own memory: a view, not a copy
        sources.append(_Source(f"{name}.weight", weight.shape, None, weight))
        self.keep.append(weight)
        return weight.ctypes.data

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Optional[Array], cache: KVCache) -> Array:
        """x (B, C) embeddings, cos/sin (B|1, D), mask (B, past + 1) additive or None ->
        logits (B, V); the step appends each layer's key and value to `cache`."""
        B, past = x.shape[0], cache.get_seq_length()
        with self._lock:  # one step at a time: the step's struct and scratch memory are shared
            buffers = [cache.append_arrays(i, 1) for i in range(self.model.layers)]
            pointers = tuple(array.ctypes.data for pair in buffers for array in pair)
            capacity = tuple(keys.shape[2] for keys, _ in buffers)
            if (pointers, capacity) != self._pointers:  # the cache grew or changed rows
                self._keys = (ctypes.c_void_p * len(buffers))(*pointers[0::2])
                self._values = (ctypes.c_void_p * len(buffers))(*pointers[1::2])
                self._capacity = (ctypes.c_int32 * len(buffers))(*capacity)
                self._pointers = (pointers, capacity)
            threads = torch.get_num_threads()
            need = self.library.tl_workspace(ctypes.byref(self.model), B, past + 1, threads)
            if self.work.size < need:
                self.work = np.empty(max(need, 2 * self.work.size), dtype=np.float32)
            logits = np.empty((B, self.model.vocab), dtype=np.float32)
            step = self.step
            step.batch, step.past, step.rope_rows, step.capacity = B, past, cos.shape[0], self._capacity
            step.x, step.cos, step.sin = x.ctypes.data, cos.ctypes.data, sin.ctypes.data
            step.mask = None if mask is None else mask.ctypes.data
            step.keys, step.values = self._keys, self._values
            step.logits, step.work = logits.ctypes.data, self.work.ctypes.data
            self.library.tl_decode(ctypes.byref(self.model), ctypes.byref(step), threads)
        return logits


class _PackedLayer:
    """One decoder layer's weights in decoding layout; `prefix` is its parameter-name prefix."""

    def __init__(self, layer: nn.Module, prefix: str, weights: str, sources: Sources, parts: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_layernorm = _numpy_fn(f"{prefix}.input_layernorm", layer.input_layernorm, sources)
        self.post_attention_layernorm = _numpy_fn(
            f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm, sources
        )
        a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
        matrix = functools.partial(_Matrix, weights=weights, sources=sources, parts=parts)
        self.qkv = matrix(
            [(f"{a}.{p}_proj", getattr(attn, f"{p}_proj")) for p in "qkv"]
        )  # C -> (H + 2 H_kv) D
        self.o_proj = matrix([(f"{a}.o_proj", attn.o_proj)])
        self.gate_up = matrix(
            [(f"{m}.{p}_proj", getattr(mlp, f"{p}_proj")) for p in ("gate", "up")]
        )  # C -> 2 I
        self.down_proj = matrix([(f"{m}.down_proj", mlp.down_proj)])
        self.act_fn = _numpy_fn(f"{m}.act_fn", mlp.act_fn, sources)
        self.intermediate_size = mlp.down_proj.in_features


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
    def for_model(cls, model: nn.Module, weights: str = "float32") -> "FastDecoder":
        """The model's packed decoder for `weights` (one of SAMPLE_WEIGHTS), built on first use and again
        whenever the model no longer holds what was packed (see `matches`)."""
        decoders = _DECODERS.setdefault(model, {})
        decoder = decoders.get(weights)
        if decoder is None or decoder.parts not in (None, _parts()) or not decoder.matches(model):
            decoder = decoders[weights] = cls(model, weights)  # float32 blocks follow the threads
        return decoder

    @staticmethod
    def compiled_unsupported(model: nn.Module) -> Optional[str]:
        """Why the compiled step (tinyllama/kernels) cannot run `model`, or None if it can: it
        knows RMSNorm and SiLU only, and must be buildable on this machine."""
        backbone = model.model
        norms = [backbone.norm] + [
            n for layer in backbone.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        if any(type(n) is not RMSNorm or n.variance_epsilon != backbone.norm.variance_epsilon for n in norms):
            return "norms other than RMSNorm"
        if any(type(layer.mlp.act_fn) is not nn.SiLU for layer in backbone.layers):
            return "an activation other than SiLU"
        if kernels.decode_library() is None:  # (logged once, at INFO: why it is not built)
            return kernels.decode_unavailable()
        return None

    @torch.no_grad()
    def __init__(self, model: nn.Module, weights: str = "float32", backend: str = "auto") -> None:
        """backend: "compiled" (tinyllama/kernels/decode.c, built on first use), "numpy", or
        "auto": compiled where `compiled_unsupported` finds nothing against it, else NumPy."""
        if weights not in SAMPLE_WEIGHTS:
            raise ValueError(f"weights={weights!r}: expected one of {', '.join(SAMPLE_WEIGHTS)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        reason = self.compiled_unsupported(model) if backend != "numpy" else "backend=numpy"
        if backend == "compiled" and reason is not None:
            raise ValueError(f"the compiled decoding step cannot run this model: {reason}")
        self.backend = "compiled" if reason is None else "numpy"
        self.weights = weights
        backbone = model.model
        self.config = config = backbone.config
        self._sources: Sources = []
        self.embed_tokens = backbone.embed_tokens.weight.detach().numpy()  # (V, C), shared, not copied
        self._sources.append(
            _Source("model.embed_tokens.weight", self.embed_tokens.shape, None, self.embed_tokens)
        )
        self.rotary_emb = backbone.rotary_emb
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.resolved_num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self._identity = _module_identity(model)
        self._tables: Optional[Tuple[torch.Tensor, Array, Array]] = None
        self.compiled: Optional[_KernelModel] = None
        self.parts: Optional[int] = None  # column blocks per float32 matrix of the NumPy step
        if self.backend == "compiled":
            self.compiled = _KernelModel(model, weights, self._sources, kernels.decode_library())
            return
        self.parts = _parts() if weights == "float32" else None
        self.layers: List[_PackedLayer] = [
            _PackedLayer(layer, f"model.layers.{i}", weights, self._sources, self.parts or 1)
            for i, layer in enumerate(backbone.layers)
        ]
        self.norm = _numpy_fn("model.norm", backbone.norm, self._sources)
        self.lm_head = _Matrix(
            [("lm_head", model.lm_head)], weights, self._sources, self.parts or 1
        )  # C -> V

    @property
    def nbytes(self) -> int:
        """Bytes of the packed matrices (the embedding and norm gains are the model's own)."""
        if self.compiled is not None:
            return self.compiled.nbytes
        return (
            sum(
                m.nbytes
                for layer in self.layers
                for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)
            )
            + self.lm_head.nbytes
        )

    @torch.no_grad()
    def matches(self, model: nn.Module) -> bool:
        """True while `model` holds exactly what was packed here: the same modules (a swapped
        norm or activation runs as itself) and the same parameters with equal values, compared
        array by array (a view that still shares the parameter's memory needs no comparison).
        Quantized matrices compare the CRC-32 of the parameter's bytes with the one packed
        instead: a change goes unseen only where the checksums collide (about 2^-32). Made of
        public calls only, so every kind of write is seen; it costs about one read of the
        weights."""
        if _module_identity(model) != self._identity:
            return False
        params = dict(model.named_parameters(remove_duplicate=False))  # a tied head under both names
        for source in self._sources:
            p = params.get(source.name)
            if (
                p is None
                or p.device.type != "cpu"
                or p.dtype != torch.float32
                or tuple(p.shape) != source.shape
            ):
                return False
            current = p.detach()
            if isinstance(source.packed, int):
                if zlib.crc32(current.contiguous().numpy()) != source.packed:
                    return False
                continue
            if source.rows is not None:
                current = current[source.rows]
            packed = torch.from_numpy(source.packed)
            if packed.dim() == 3:  # whole strips (strips, vector, C_in): the rows seen the same way
                current = current.reshape(packed.shape)
            shared = current.data_ptr() == packed.data_ptr() and current.stride() == packed.stride()
            # torch.equal: no temporary array, threaded (np.array_equal builds a boolean copy)
            if not (shared or torch.equal(current, packed)):
                return False
        return True

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
        expected, got = (B, self.num_key_value_heads, self.head_dim), cache.shape[:2] + cache.shape[3:]
        if got != expected:  # before anything is written (the compiled step reads what it is given)
            raise ValueError(f"the cache holds (B, H_kv, D) = {got}; this step needs {expected}")
        x = self.embed_tokens[input_ids.numpy()[:, 0]]  # (B, C)
        positions = None if position_ids is None else position_ids.numpy()  # (B, 1)
        cos, sin = self._cos_sin(positions, past)  # (B|1, 1, 2, D/2): one table for every head
        mask = None  # one new token may see the whole cache, unless some of it is padding
        if attention_mask is not None:
            # dtype-min, not -inf, as masks.to_additive: a row that sees nothing stays finite
            mask = np.where(
                attention_mask.numpy()[:, None, None, :] > 0, np.float32(0), np.finfo(np.float32).min
            )  # (B, 1, 1, S): broadcast over H_kv and G
        if self.compiled is not None:
            rows = cos.shape[0]
            mask = None if mask is None else np.ascontiguousarray(mask.reshape(B, -1))
            logits = self.compiled(
                x,
                np.ascontiguousarray(cos.reshape(rows, -1)),
                np.ascontiguousarray(sin.reshape(rows, -1)),
                mask,
                cache,
            )
            return torch.from_numpy(logits)
        # Silent on float overflow, like torch (silu's exp(-x) reaching inf is even meant): a
        # diverged model shows in its logits, not as NumPy warnings.
        shared = threads_shared()
        with np.errstate(all="ignore"):
            for i, layer in enumerate(self.layers):
                x = x + self._attention(layer.input_layernorm(x), layer, i, cos, sin, mask, cache, shared)
                gate_up = layer.gate_up(layer.post_attention_layernorm(x), shared)
                gate, up = gate_up[:, : layer.intermediate_size], gate_up[:, layer.intermediate_size :]
                x = x + layer.down_proj(layer.act_fn(gate) * up, shared)
            return torch.from_numpy(self.lm_head(self.norm(x), shared))

    def _cos_sin(self, positions: Optional[Array], past: int) -> Tuple[Array, Array]:
        """RoPE's tables at positions (B, 1) (None: every row at `past`), shaped (B|1, 1, 2, D/2)
        for the halves of each head: cos, and sin with its first half negated, so that with q
        viewed as its two halves [x1, x2], q * cos + (q with the halves swapped) * sin equals
        q * cos + rotate_half(q) * sin, the swap being a view. The rotary module's own tables,
        kept here as arrays while it holds the same ones; where it has none (dynamic scaling
        past the context), what it computes."""
        max_position = past + 1 if positions is None else int(positions.max()) + 1
        tables = self.rotary_emb.tables(max_position)
        half = self.head_dim // 2
        if tables is None:
            like = torch.empty(0)  # forward reads only the dtype (float32) and the device of x
            at = np.full((1, 1), past) if positions is None else positions
            cos, sin = self.rotary_emb(like, torch.from_numpy(at), max_position)
            cos, sin = cos.numpy(), sin.numpy().copy()
            sin[..., :half] *= -1
            return cos.reshape(*cos.shape[:-1], 2, half), sin.reshape(*sin.shape[:-1], 2, half)
        if self._tables is None or self._tables[0] is not tables[0]:
            cos, sin = tables[0].numpy(), tables[1].numpy().copy()
            sin[:, :half] *= -1
            self._tables = (tables[0], cos.reshape(-1, 1, 2, half), sin.reshape(-1, 1, 2, half))
        _, cos, sin = self._tables
        if positions is None:
            return cos[past : past + 1], sin[past : past + 1]
        return cos[positions[:, 0]], sin[positions[:, 0]]

    def _attention(
        self,
        h: Array,
        layer: _PackedLayer,
        layer_idx: int,
        cos: Array,
        sin: Array,
        mask: Optional[Array],
        cache: KVCache,
        shared: bool,
    ) -> Array:
        """Normed hidden states (B, C) -> attention output after o_proj (B, C)."""
        B = h.shape[0]
        H, H_kv, D = self.num_heads, self.num_key_value_heads, self.head_dim
        qkv = layer.qkv(h, shared).reshape(B, H + 2 * H_kv, 2, D // 2)  # each head as its two halves
        qk = qkv[:, : H + H_kv]
        qk = qk * cos + qk[:, :, ::-1] * sin  # RoPE on q and k heads at once
        # One new position per row: (B, H_kv, D) -> (B, H_kv, 1, D); back come all (B, H_kv, S, D).
        keys, values = cache.update_arrays(
            qk[:, H:].reshape(B, H_kv, 1, D), qkv[:, H + H_kv :].reshape(B, H_kv, 1, D), layer_idx
        )
        # Query heads grouped by the k/v head they share, (B, H_kv, G, D): one product per k/v head.
        q = qk[:, :H].reshape(B, H_kv, H // H_kv, D)
        scores = q @ keys.swapaxes(-1, -2)  # (B, H_kv, G, S)
        scores *= self.scaling
        if mask is not None:
            scores += mask
        # softmax over the keys in NumPy: torch's kernel is one pass instead of five, but off the
        # main thread (the server's engine) each call opens an OpenMP region, ~10 us
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = (weights @ values).reshape(B, H * D)  # (B, H_kv, G, D) -> heads side by side
        return layer.o_proj(out, shared)


def threads_shared() -> bool:
    """Whether torch's thread pool runs the products of this step: it has several threads and
    this is the main thread (off it each OpenMP region costs about a thread start)."""
    return torch.get_num_threads() > 1 and threading.current_thread() is threading.main_thread()


def _parts() -> int:
    """Column blocks per float32 matrix: two per torch thread, so that the threads share a
    batch-1 product evenly (BENCHMARKS.md, generation: 4 blocks on 2 threads beat 2)."""
    return 2 * torch.get_num_threads()


def _module_identity(model: nn.Module) -> Tuple:
    """Which module objects, under which names, make up the model, and its parameter names: a
    swapped module or an added parameter (a bias set on a projection) changes it."""
    return (
        tuple((name, id(module)) for name, module in model.named_modules()),
        tuple(name for name, _ in model.named_parameters(remove_duplicate=False)),
    )
