"""The inspect stage's library: look inside a model without training it.

    python scripts/inspect_model.py model=llama2_7b                  # tree, counts, FLOPs, memory
    python scripts/inspect_model.py model=tiny inspect.trace=true    # + tensor shapes of one forward

What the model itself does not say, for learners (the course) and for sizing a run: parameters
per component (embeddings, attention, mlp, norms, head), the memory of the training state, and
the tensor shapes at every step of one forward pass (forward hooks, plus the attention steps
replayed between the projections), formatted as one report. Totals and FLOPs come from the model
(`num_parameters`, `LlamaForCausalLM.flops_per_token`, whose docstring gives the FLOP formula):
the functions here only add the breakdown and accept a config as well as a model.

Given a config, a model is built on PyTorch's ``meta`` device: every parameter has a shape and a
dtype but no storage, so a 7B model "exists" in a second and a few megabytes.

(Named inspection, not inspect: a module called inspect shadows the standard library's.)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from tinyllama.config import InspectConfig
from tinyllama.errors import ConfigError
from tinyllama.model import LlamaConfig, LlamaForCausalLM, apply_rotary_pos_emb, repeat_kv
from tinyllama.model.attention import eager_attention

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head")
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}
# Above this many parameters (0.8 GB in fp32) a shape trace runs on the meta device instead.
TRACE_CPU_MAX_PARAMS = 200_000_000


def build_meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    """The model with shapes but no storage: seconds and no memory even for 7B parameters."""
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _component(name: str) -> str:
    """Which part of the architecture a parameter name (Hugging Face naming) belongs to."""
    if "embed_tokens" in name:
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:  # input_layernorm, post_attention_layernorm, model.norm
        return "norms"
    if name.startswith(("lm_head.", "score.")):
        return "head"
    raise ValueError(f"parameter {name!r} belongs to no known component {COMPONENTS}")


def _as_model(config_or_model: Union[LlamaConfig, nn.Module]) -> nn.Module:
    """The model itself, or one built on the meta device from a config (the first meta build in a
    process takes a few seconds: torch imports its compiler stack for meta initialisers)."""
    if isinstance(config_or_model, LlamaConfig):
        return build_meta_model(config_or_model)
    return config_or_model


def count_parameters(config_or_model: Union[LlamaConfig, nn.Module]) -> Dict[str, int]:
    """Exact parameter counts: one entry per component, total and non_embedding.

    A tied LM head shares the embedding's tensor, so it is counted once, under embeddings
    (``head`` is then 0); total is the model's ``num_parameters()``, non_embedding its
    ``num_parameters(exclude_embeddings=True)``.
    """
    model = _as_model(config_or_model)
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # yields a shared (tied) tensor once
        counts[_component(name)] += p.numel()
    counts["total"] = model.num_parameters()
    counts["non_embedding"] = model.num_parameters(exclude_embeddings=True)
    return counts


def flops_per_token(config_or_model: Union[LlamaConfig, nn.Module], seq_len: int) -> Dict[str, int]:
    """The model's ``flops_per_token(seq_len)`` (forward, training, n, attention_forward,
    seq_len), for a config too."""
    return _as_model(config_or_model).flops_per_token(seq_len)


def memory_estimate(config_or_model: Union[LlamaConfig, nn.Module]) -> Dict[str, object]:
    """Bytes for weights, gradients and AdamW state (two moments per parameter), per dtype.

    "bf16" stores all three in bf16 (pure bf16 training). Mixed precision (``train.precision=bf16``
    autocast) keeps fp32 weights, gradients and moments: read the fp32 row. Activations are not
    included: they grow with batch x seq_len (gradient checkpointing trades them for compute).
    """
    total = _as_model(config_or_model).num_parameters()
    estimate: Dict[str, object] = {"parameters": total}
    for dtype, nbytes in BYTES_PER_VALUE.items():
        row = _state_bytes(total, nbytes)
        row["total"] = sum(row.values())
        estimate[dtype] = row
    return estimate


def _state_bytes(parameters: int, nbytes: int) -> Dict[str, int]:
    """Weights, gradients and AdamW's two moments of `parameters` values of `nbytes` each."""
    return {
        "weights": parameters * nbytes,
        "gradients": parameters * nbytes,
        "adamw": 2 * parameters * nbytes,
    }


# Parameters that tensor parallelism splits (torchtitan's plan: q/k/v and gate/up by columns,
# o and down by rows, the embedding by rows, the head by columns); norms stay whole.
_TP_SPLIT = ("embeddings", "attention", "mlp", "head")


def per_device_memory(
    config_or_model: Union[LlamaConfig, nn.Module],
    parallel: str = "ddp",
    devices: int = 1,
    tp: int = 1,
    seq_len: Optional[int] = None,
    batch_size: int = 1,
) -> Dict[str, int]:
    """Bytes one device holds while training, in fp32 (mixed-precision autocast keeps fp32
    weights, gradients and AdamW moments): weights, gradients, adamw, activations, total.

    The devices form a (data x tensor) grid, data = devices / tp. Tensor parallelism splits the
    projections, embedding and head `tp` ways (norms whole); FSDP then shards each device's part
    over the data-parallel devices (rounded up, as fully_shard pads), where DDP keeps it whole.
    Activations: the bytes autograd saves for the backward pass over a batch of `batch_size`
    sequences of `seq_len` tokens (default: the context), counted on the meta device with
    saved-tensor hooks, so they are the model's own, not a formula; with tp > 1 they are the tp=1
    figure (an upper bound: the parts inside attention and MLP shrink by tp, the residual stream
    does not). Not included: FSDP's transient all-gathered layer, the optimizer's temporaries.
    """
    model = _as_model(config_or_model)
    data = devices // tp
    local = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if tp > 1 and _component(name) in _TP_SPLIT:
            n = -(-n // tp)
        if parallel == "fsdp":
            n = -(-n // data)
        local += n
    T = seq_len or model.config.max_position_embeddings
    row = _state_bytes(local, BYTES_PER_VALUE["fp32"])
    row["activations"] = activation_bytes(model, T, batch_size)
    row["total"] = sum(row.values())
    return row


def activation_bytes(
    config_or_model: Union[LlamaConfig, nn.Module], seq_len: int, batch_size: int = 1
) -> int:
    """Bytes of the tensors autograd saves in one training forward (loss included) over
    (batch_size, seq_len) token ids, fp32, counted on the meta device (no memory, any size;
    a model with weights is counted through a meta copy of its config). A tensor saved by
    several operations counts once."""
    model = _as_model(config_or_model)
    if next(model.parameters()).device.type != "meta":
        model = build_meta_model(model.config)
    seen: Dict[int, int] = {}
    params = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params:  # weights are counted as weights
            seen[id(t)] = t.numel() * t.element_size()
        return t

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(seen.values())


def format_device_memory(model: LlamaForCausalLM, options: InspectConfig) -> str:
    T = options.seq_len or model.config.max_position_embeddings
    row = per_device_memory(model, options.parallel, options.devices, options.tp, T, options.batch_size)
    unit, size = ("GiB", 2**30) if row["total"] >= 2**30 else ("MiB", 2**20)
    data = options.devices // options.tp
    lines = [
        f"memory per device in {unit}, training in fp32 state: {options.parallel} on {options.devices} "
        f"device(s) (data {data} x tensor {options.tp}), activations for {options.batch_size} x {T} tokens:",
        f"  {'weights':>10}{'gradients':>11}{'AdamW (m, v)':>14}{'activations':>13}{'total':>10}",
        f"  {row['weights'] / size:>10.2f}{row['gradients'] / size:>11.2f}{row['adamw'] / size:>14.2f}"
        f"{row['activations'] / size:>13.2f}{row['total'] / size:>10.2f}",
    ]
    return "\n".join(lines)


def attention_steps(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> List[Tuple[str, torch.Tensor]]:
    """Replay, step by step, what ``attn`` does between its projections and ``o_proj``.

    q (B, T, H*D), k and v (B, T, KV*D) are the projection outputs; cos, sin (B, T, D) the
    rotary tables of the positions. Plain causal attention (no padding, no window, no cache)
    in the eager formulas, whichever implementation the model itself runs.
    """
    B, T, _ = q.shape
    heads, kv_heads, head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q = q.view(B, T, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, kv_heads, head_dim).transpose(1, 2)  # (B, KV, T, D)
    v = v.view(B, T, kv_heads, head_dim).transpose(1, 2)  # (B, KV, T, D)
    steps = [("q_heads", q), ("k_heads", k), ("v_heads", v)]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    steps += [("q_rope", q), ("k_rope", k)]
    k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)  # (B, H, T, D)
    steps += [("k_repeat_kv", k), ("v_repeat_kv", v)]
    output, weights = eager_attention(q, k, v, None, attn.scaling)  # (B, H, T, D), (B, H, T, T)
    return steps + [("attn_weights", weights), ("attn_output_heads", output)]


def trace_tensors(model: LlamaForCausalLM, input_ids: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """Run one forward pass of ``model`` on ``input_ids`` (B, T) and return (name, tensor) in
    execution order: forward hooks on the named submodules, plus the inner attention steps
    replayed by :func:`attention_steps` just before each ``o_proj`` runs."""
    steps: List[Tuple[str, torch.Tensor]] = [("input_ids", input_ids)]
    rope: Dict[str, torch.Tensor] = {}
    proj: Dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args, output):
            steps.append((name, output[0] if isinstance(output, tuple) else output))

        return hook

    def record_input(name: str):
        def hook(module, args):
            steps.append((name, args[0]))

        return hook

    def keep_rope(module, args, output):
        rope["cos"], rope["sin"] = output

    def keep_proj(key: str):
        def hook(module, args, output):
            proj[key] = output

        return hook

    def replay(prefix: str, attn: nn.Module):
        def hook(module, args):
            for name, tensor in attention_steps(
                attn, proj["q"], proj["k"], proj["v"], rope["cos"], rope["sin"]
            ):
                steps.append((f"{prefix}.{name}", tensor))
            steps.append((f"{prefix}.attn_output", args[0]))  # heads merged: (B, T, H*D)

        return hook

    backbone = model.model
    hooks = [
        backbone.embed_tokens.register_forward_hook(record("model.embed_tokens")),
        backbone.rotary_emb.register_forward_hook(keep_rope),
    ]
    for i, layer in enumerate(backbone.layers):
        p, attn, mlp = f"model.layers.{i}", layer.self_attn, layer.mlp
        hooks.append(layer.input_layernorm.register_forward_hook(record(f"{p}.input_layernorm")))
        for key in "qkv":
            module = getattr(attn, f"{key}_proj")
            hooks.append(module.register_forward_hook(keep_proj(key)))
            hooks.append(module.register_forward_hook(record(f"{p}.self_attn.{key}_proj")))
        hooks.append(attn.o_proj.register_forward_pre_hook(replay(f"{p}.self_attn", attn)))
        hooks.append(attn.o_proj.register_forward_hook(record(f"{p}.self_attn.o_proj")))
        # The input of the second norm is the residual stream after attention: x + attn(x).
        hooks.append(
            layer.post_attention_layernorm.register_forward_pre_hook(record_input(f"{p}.residual_attn"))
        )
        hooks.append(
            layer.post_attention_layernorm.register_forward_hook(record(f"{p}.post_attention_layernorm"))
        )
        for name in ("gate_proj", "up_proj", "down_proj"):
            hooks.append(getattr(mlp, name).register_forward_hook(record(f"{p}.mlp.{name}")))
        hooks.append(layer.register_forward_hook(record(f"{p}.residual_mlp")))
    hooks.append(backbone.norm.register_forward_hook(record("model.norm")))
    hooks.append(model.lm_head.register_forward_hook(record("lm_head")))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in hooks:
            handle.remove()
    return steps


def trace_shapes(
    config: LlamaConfig,
    seq_len: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "cpu",
) -> List[Tuple[str, Tuple[int, ...]]]:
    """Shapes at each step of one forward pass on random input_ids (the course's exercise).

    seq_len None draws a length in [4, 30] from ``seed``; ids are uniform below vocab_size.
    ``device="meta"`` propagates shapes without allocating any weight (any model size).
    """
    gen = torch.Generator().manual_seed(seed)
    if seq_len is None:
        seq_len = int(torch.randint(4, 31, (1,), generator=gen))
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    return [(name, tuple(t.shape)) for name, t in trace_tensors(model, input_ids.to(device))]


# ---- the printed report (scripts/inspect_model.py) ----------------------------------------------

# Each traced step's shape in the course notes' letters (suffix of the step name -> shape).
SYMBOLIC = {
    "input_ids": "(B, T)",
    "embed_tokens": "(B, T, C)",
    "input_layernorm": "(B, T, C)",
    "q_proj": "(B, T, H*D)",
    "k_proj": "(B, T, KV*D)",
    "v_proj": "(B, T, KV*D)",
    "q_heads": "(B, H, T, D)",
    "k_heads": "(B, KV, T, D)",
    "v_heads": "(B, KV, T, D)",
    "q_rope": "(B, H, T, D)",
    "k_rope": "(B, KV, T, D)",
    "k_repeat_kv": "(B, H, T, D)",
    "v_repeat_kv": "(B, H, T, D)",
    "attn_weights": "(B, H, T, T)",
    "attn_output_heads": "(B, H, T, D)",
    "attn_output": "(B, T, H*D)",
    "o_proj": "(B, T, C)",
    "residual_attn": "(B, T, C)",
    "post_attention_layernorm": "(B, T, C)",
    "gate_proj": "(B, T, I)",
    "up_proj": "(B, T, I)",
    "down_proj": "(B, T, C)",
    "residual_mlp": "(B, T, C)",
    "norm": "(B, T, C)",
    "lm_head": "(B, T, V)",
}


def format_parameters(model: LlamaForCausalLM) -> str:
    counts = count_parameters(model)
    total = counts["total"]
    lines = [f"parameters: {total:,} ({total / 1e9:.3f} B)"]
    for name in COMPONENTS + ("non_embedding",):
        note = "  (tied to embeddings)" if name == "head" and model.config.tie_word_embeddings else ""
        lines.append(f"  {name:<14}{counts[name]:>16,}  {100 * counts[name] / total:5.1f}%{note}")
    return "\n".join(lines)


def format_flops(model: LlamaForCausalLM, seq_len: int) -> str:
    f = model.flops_per_token(seq_len)
    return "\n".join(
        [
            f"FLOPs per token at T={seq_len} (inspect.seq_len; multiply-add = 2 FLOPs; formula in "
            "LlamaForCausalLM.flops_per_token, tinyllama/model/heads.py):",
            f"  N (non-embedding, LM head included) = {f['n']:,}",
            f"  forward  = 2N + 4LHDT   = {f['forward'] / 1e9:10.3f} GFLOP"
            f"  (attention {100 * f['attention_forward'] / f['forward']:.1f}%)",
            f"  training = 6N + 12LHDT  = {f['training'] / 1e9:10.3f} GFLOP",
        ]
    )


def format_memory(model: LlamaForCausalLM) -> str:
    est = memory_estimate(model)
    unit, size = ("GiB", 2**30) if est["fp32"]["total"] >= 2**30 else ("MiB", 2**20)
    lines = [
        f"memory for training state in {unit} (activations not included; mixed-precision "
        "autocast keeps fp32 state: read fp32):",
        f"  {'dtype':<6}{'weights':>10}{'gradients':>11}{'AdamW (m, v)':>14}{'total':>10}",
    ]
    for dtype in BYTES_PER_VALUE:
        row = est[dtype]
        lines.append(
            f"  {dtype:<6}{row['weights'] / size:>10.2f}{row['gradients'] / size:>11.2f}"
            f"{row['adamw'] / size:>14.2f}{row['total'] / size:>10.2f}"
        )
    return "\n".join(lines)


def format_trace(config: LlamaConfig, trace: List[Tuple[str, Tuple[int, ...]]], device: str) -> str:
    B, T = trace[0][1]
    lines = [
        f"shape trace of one forward pass on random input_ids (device {device}):",
        f"  B={B} T={T} C={config.hidden_size} H={config.num_attention_heads} "
        f"KV={config.resolved_num_key_value_heads} D={config.resolved_head_dim} "
        f"I={config.intermediate_size} V={config.vocab_size} L={config.num_hidden_layers}",
    ]
    if device == "meta":
        lines.insert(
            1,
            "  meta device: shapes only, no weights or values exist (big models would not "
            "fit in memory; inspect.trace_device=cpu forces real tensors)",
        )
    width = max(len(name) for name, _ in trace) + 2
    for name, shape in _collapse_repeated_layers(trace):
        symbolic = SYMBOLIC.get(name.rsplit(".", 1)[-1], "")
        lines.append(f"  {name:<{width}}{str(shape):<22}{symbolic}".rstrip())
    return "\n".join(lines)


def _collapse_repeated_layers(trace: List[Tuple[str, Tuple[int, ...]]]) -> List[Tuple[str, object]]:
    """Layers 1..L-1 whose shapes equal layer 0's become one line, as PyTorch's module tree
    prints "(0-31): 32 x DecoderLayer"."""

    def layer_of(name: str) -> Optional[int]:
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None

    per_layer: Dict[int, List[Tuple[str, Tuple[int, ...]]]] = {}
    for name, shape in trace:
        if layer_of(name) is not None:
            per_layer.setdefault(layer_of(name), []).append((name.split(".", 3)[3], shape))
    same = [i for i in sorted(per_layer) if i > 0 and per_layer[i] == per_layer[0]]
    if not same:
        return list(trace)
    out: List[Tuple[str, object]] = [(n, s) for n, s in trace if layer_of(n) not in same]
    last0 = max(i for i, (n, _) in enumerate(out) if layer_of(n) == 0)
    note = f"model.layers.{same[0]}-{same[-1]}" if len(same) > 1 else f"model.layers.{same[0]}"
    out.insert(last0 + 1, (note, "same shapes as model.layers.0"))
    return out


def choose_trace_device(config_or_model: Union[LlamaConfig, nn.Module], requested: str) -> str:
    """ "auto" traces real tensors on the CPU for small models and shapes on meta for big ones."""
    total = _as_model(config_or_model).num_parameters()
    if requested == "auto":
        return "cpu" if total <= TRACE_CPU_MAX_PARAMS else "meta"
    if requested == "cpu" and total > TRACE_CPU_MAX_PARAMS:
        raise ConfigError(
            f"inspect.trace_device=cpu would allocate {4 * total / 1e9:.1f} GB of fp32 weights for "
            f"{total:,} parameters (limit {TRACE_CPU_MAX_PARAMS:,}): use inspect.trace_device=meta "
            f"(shapes only, no memory) or a small preset such as model=tiny"
        )
    return requested


def inspect_report(config: LlamaConfig, options: InspectConfig, seed: int) -> str:
    """Everything scripts/inspect_model.py prints, as one string."""
    model = build_meta_model(config)
    sections = [str(model)] if options.tree else []
    sections += [
        format_parameters(model),
        format_flops(model, options.seq_len or config.max_position_embeddings),
        format_memory(model),
        format_device_memory(model, options),
    ]
    if options.trace:
        device = choose_trace_device(model, options.trace_device)
        trace = trace_shapes(config, options.trace_seq_len, seed, options.trace_batch_size, device)
        sections.append(format_trace(config, trace, device))
    return "\n\n".join(sections)
