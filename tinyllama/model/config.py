"""Model configuration with Hugging Face's field names, so a learner can read the course notes
(and `transformers`' LlamaConfig / Qwen2Config) side by side with this file.

The allowed values of a field live where they are used: hidden_act in mlp.ACTIVATIONS,
rope_scaling's types and keys in rotary.ROPE_TYPES; this module checks against those tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from tinyllama.errors import ConfigError
from tinyllama.model.mlp import ACTIVATIONS
from tinyllama.model.rotary import ROPE_TYPES

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass
class LlamaConfig:
    """Shape and behaviour of a Llama or Qwen2 model; checked on construction.

    The fields are kept exactly as given (so Hydra overrides compose cleanly); the derived
    values live in `resolved_head_dim` and `resolved_num_key_value_heads`.
    """

    vocab_size: int = 4096
    """Number of token ids the embedding table and the LM head cover."""
    hidden_size: int = 288
    """Width of the residual stream (C in the (B, T, C) shapes)."""
    intermediate_size: int = 768
    """Width of the SwiGLU MLP's gate and up projections."""
    num_hidden_layers: int = 6
    """Number of decoder layers."""
    num_attention_heads: int = 6
    """Number of query heads."""
    num_key_value_heads: Optional[int] = 2
    """Number of key/value heads (GQA); None means equal to num_attention_heads (MHA), 1 is MQA."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 512
    """Context length the model is trained for; RoPE scaling is relative to it."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root (guards against division by zero)."""
    hidden_act: str = "silu"
    """Activation of the MLP gate (SwiGLU uses silu)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    # Typed Any, not Optional[Dict]: OmegaConf cannot merge a dict into a None-valued typed dict,
    # so `model.rope_scaling={rope_type:linear,factor:2.0}` on the command line would fail.
    rope_scaling: Any = None
    """None, or {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...}; llama3 also needs
    low_freq_factor, high_freq_factor and original_max_position_embeddings."""
    attention_bias: bool = False
    """Llama semantics: bias on q, k, v and o projections."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (training only)."""
    mlp_bias: bool = False
    """Bias on the MLP projections (Hugging Face Llama's mlp_bias)."""
    model_type: str = "llama"
    """"llama", or "qwen2": bias on q, k, v only (not o), sliding window allowed."""
    sliding_window: Optional[int] = None
    """Qwen2: attention window in tokens for layers i >= max_window_layers; None disables it."""
    max_window_layers: int = 0
    """Qwen2: layers below this index use full attention."""
    tie_word_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""
    pad_token_id: Optional[int] = None
    """Padding id (sequence classification pools the last non-pad token)."""
    bos_token_id: int = 1
    """Beginning-of-sequence id (Llama's SentencePiece convention)."""
    eos_token_id: int = 2
    """End-of-sequence id."""
    num_labels: int = 2
    """Sequence classification: number of outputs of the score head."""
    problem_type: Optional[str] = None
    """Sequence classification loss: None (inferred), "regression", "single_label_classification",
    "multi_label_classification"."""
    attn_implementation: str = "sdpa"
    """"sdpa" (torch's fused scaled_dot_product_attention) or "eager" (explicit, readable)."""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid model config:\n  - " + "\n  - ".join(problems))

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width actually used: head_dim, or hidden_size // num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_num_key_value_heads(self) -> int:
        """Key/value heads actually used: num_key_value_heads, or num_attention_heads (MHA)."""
        kv = self.num_key_value_heads
        return kv if kv is not None else self.num_attention_heads

    def uses_sliding_window(self, layer_idx: int) -> bool:
        """Qwen2's rule: layers at index >= max_window_layers attend within the window."""
        return self.sliding_window is not None and layer_idx >= self.max_window_layers


def _problems(c: LlamaConfig) -> List[str]:
    """Every rule the config breaks, each as "field=value: rule (fix)"."""
    out: List[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            out.append(msg)

    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "num_labels",
    ):
        need(getattr(c, name) > 0, f"{name}={getattr(c, name)}: must be > 0")
    heads = c.num_attention_heads
    if c.head_dim is None:
        need(
            heads <= 0 or c.hidden_size % heads == 0,
            f"hidden_size={c.hidden_size}: must be divisible by num_attention_heads={heads} "
            "(or set head_dim explicitly)",
        )
    else:
        need(c.head_dim > 0, f"head_dim={c.head_dim}: must be > 0 (or null for hidden_size // heads)")
    if heads > 0 and (c.head_dim is None or c.head_dim > 0):
        need(
            c.resolved_head_dim % 2 == 0,
            f"head_dim={c.resolved_head_dim}: must be even (RoPE rotates pairs of channels)",
        )
    kv = c.num_key_value_heads
    if kv is not None:
        need(kv > 0, f"num_key_value_heads={kv}: must be > 0 (or null for num_attention_heads)")
        need(
            kv <= 0 or heads % kv == 0,
            f"num_key_value_heads={kv}: num_attention_heads={heads} must be a multiple of it "
            "(each key/value head serves a whole group of query heads)",
        )
    need(c.rms_norm_eps > 0, f"rms_norm_eps={c.rms_norm_eps}: must be > 0")
    need(c.rope_theta > 0, f"rope_theta={c.rope_theta}: must be > 0")
    need(c.initializer_range >= 0, f"initializer_range={c.initializer_range}: must be >= 0")
    need(0 <= c.attention_dropout < 1, f"attention_dropout={c.attention_dropout}: must be in [0, 1)")
    need(c.hidden_act in ACTIVATIONS, f"hidden_act={c.hidden_act!r}: choose one of {', '.join(ACTIVATIONS)}")
    need(
        c.attn_implementation in ("sdpa", "eager"),
        f"attn_implementation={c.attn_implementation!r}: choose sdpa or eager",
    )
    need(c.model_type in ("llama", "qwen2"), f"model_type={c.model_type!r}: choose llama or qwen2")
    need(
        not (c.model_type == "qwen2" and c.attention_bias),
        "attention_bias=True: Qwen2 always has q/k/v bias and no o_proj bias; attention_bias is for llama",
    )
    need(
        c.problem_type is None or c.problem_type in PROBLEM_TYPES,
        f"problem_type={c.problem_type!r}: choose null or one of {', '.join(PROBLEM_TYPES)}",
    )
    need(
        c.pad_token_id is None or 0 <= c.pad_token_id < c.vocab_size,
        f"pad_token_id={c.pad_token_id}: must be null or in [0, vocab_size={c.vocab_size})",
    )
    if c.sliding_window is not None:
        need(c.sliding_window > 0, f"sliding_window={c.sliding_window}: must be > 0 (or null to disable)")
        need(
            c.model_type == "qwen2",
            f"sliding_window={c.sliding_window}: a Qwen2 feature; set model_type=qwen2 or sliding_window=null",
        )
    need(c.max_window_layers >= 0, f"max_window_layers={c.max_window_layers}: must be >= 0")
    out.extend(_rope_scaling_problems(c.rope_scaling))
    return out


def _rope_scaling_problems(rs: Optional[Dict[str, Any]]) -> List[str]:
    if rs is None:
        return []
    if not isinstance(rs, Mapping):
        return [f"rope_scaling={rs!r}: must be a mapping such as {{rope_type: linear, factor: 2.0}}"]
    kind = rs.get("rope_type")
    if kind not in ROPE_TYPES:
        hint = ' (rename the key "type" to "rope_type")' if "type" in rs else ""
        return [f"rope_scaling.rope_type={kind!r}: choose one of {', '.join(ROPE_TYPES)}{hint}"]
    out = [
        f"rope_scaling={dict(rs)}: rope_type {kind} needs the key {key!r}"
        for key in ROPE_TYPES[kind]
        if rs.get(key) is None
    ]
    if not out and kind != "default" and rs["factor"] < 1:
        out.append(f"rope_scaling.factor={rs['factor']}: must be >= 1 (it stretches the context)")
    if not out and kind == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
        out.append(
            f"rope_scaling.high_freq_factor={rs['high_freq_factor']}: must be greater than "
            f"low_freq_factor={rs['low_freq_factor']}"
        )
    return out
