"""Model configuration with Hugging Face's field names, so a learner can read the course notes
(and `transformers`' LlamaConfig / Qwen2Config) side by side with this file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class LlamaConfig:
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
    rope_scaling: Optional[Dict[str, Any]] = None
    """None, or {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...}."""
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
