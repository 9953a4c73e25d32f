"""The decoder backbone: token embedding, a stack of pre-norm decoder layers, a final RMSNorm;
and what every model of this package shares (LlamaPreTrainedModel: initialisation,
num_parameters)."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinyllama.model.attention import Attention
from tinyllama.model.cache import KVCache
from tinyllama.model.config import LlamaConfig
from tinyllama.model.masks import build_attention_mask
from tinyllama.model.mlp import MLP
from tinyllama.model.norm import RMSNorm
from tinyllama.model.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ModelParts:
    """The classes the model is built from; replace any of them with your own implementation
    (same constructor and forward signatures) to try it inside the full model:

    norm(hidden_size, eps); rotary(config); attention(config, layer_idx); mlp(config).
    """

    norm: Callable[..., nn.Module] = RMSNorm
    rotary: Callable[..., nn.Module] = RotaryEmbedding
    attention: Callable[..., nn.Module] = Attention
    mlp: Callable[..., nn.Module] = MLP


@dataclass
class BaseModelOutput:
    last_hidden_state: torch.Tensor
    """(B, T, C) after the final norm."""
    past_key_values: Optional[KVCache] = None
    """The cache holding this call's keys/values (use_cache=True), to pass to the next call."""


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): normalising the branch inputs (pre-norm) keeps
    the residual stream an untouched sum, which is what lets deep stacks train stably."""

    def __init__(self, config: LlamaConfig, layer_idx: int, parts: ModelParts = ModelParts()) -> None:
        super().__init__()
        self.self_attn = parts.attention(config, layer_idx)
        self.mlp = parts.mlp(config)
        self.input_layernorm = parts.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = parts.norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class LlamaPreTrainedModel(nn.Module):
    """Shared by the backbone and the heads: weight initialisation and parameter counting."""

    config: LlamaConfig

    def init_weights(self) -> None:
        """Initialise like transformers: linear and embedding weights ~ N(0, initializer_range),
        biases 0, the padding embedding row 0, norm gains 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Distinct parameters, as transformers' `num_parameters`: a tied lm_head is the embedding
        tensor and counts once. only_trainable leaves out frozen ones (requires_grad=False);
        exclude_embeddings leaves out the token embedding table (and so a head tied to it).
        Works on the meta device: only shapes are read."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for p in self.parameters()  # yields a shared (tied) tensor once
            if not (exclude_embeddings and id(p) in embeddings) and (p.requires_grad or not only_trainable)
        )


class LlamaModel(LlamaPreTrainedModel):
    """embed_tokens -> layers -> norm. Set `gradient_checkpointing = True` to recompute each
    layer's activations during backward instead of storing them (less memory, ~1/3 more compute)."""

    def __init__(self, config: LlamaConfig, parts: ModelParts = ModelParts()) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i, parts) for i in range(config.num_hidden_layers))
        self.norm = parts.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = parts.rotary(config)
        self.gradient_checkpointing = False
        self._warned_cache_with_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
    ) -> BaseModelOutput:
        """input_ids (B, T) -> hidden states (B, T, C).

        attention_mask: (B, past + T), 1 = token, 0 = padding; None = no padding.
            Or a boolean (B|1, 1, T, past + T) mask, used as is (packed sequences: masks.py).
        position_ids: (B, T); None means past, past + 1, ..., the cache length onward. A left-padded
            batch must pass its own, counting from each row's first real token, as transformers'
            generate does: `(attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]`.
        past_key_values / use_cache: see `KVCache`; use_cache without a cache creates one. A given
            cache is always updated and returned.
        """
        # Checkpointing saves activation memory for a backward pass; without gradients (sampling
        # from a model in train mode, say) there is none, so the layers run plainly.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if recompute and use_cache:
            if not self._warned_cache_with_checkpointing:
                warnings.warn(
                    "use_cache=True is incompatible with gradient checkpointing; using use_cache=False",
                    stacklevel=2,
                )
                self._warned_cache_with_checkpointing = True
            use_cache, past_key_values = False, None  # recomputing a layer would write the cache twice
        bsz, q_len = input_ids.shape
        hidden_states = self.embed_tokens(input_ids)  # (B, T, C)
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config, bsz, q_len)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        max_position = None  # only known without a device sync for the default positions
        if position_ids is None:
            position_ids = torch.arange(past, past + q_len, device=input_ids.device)[None]  # (1, T)
            max_position = past + q_len
        position_embeddings = self.rotary_emb(hidden_states, position_ids, max_position)
        # One mask for full-attention layers, one for Qwen2's sliding-window layers (if any).
        make_mask = functools.partial(
            build_attention_mask,
            attention_mask,
            q_len,
            past,
            input_ids.device,
            allow_implicit_causal=self.config.attn_implementation == "sdpa",
        )
        full_mask = make_mask()
        window_mask = (
            make_mask(sliding_window=self.config.sliding_window) if self.config.sliding_window else None
        )

        for i, layer in enumerate(self.layers):
            mask = window_mask if self.config.uses_sliding_window(i) else full_mask
            if recompute:
                hidden_states = checkpoint(
                    layer, hidden_states, position_embeddings, mask, past_key_values, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, position_embeddings, mask, past_key_values)
        return BaseModelOutput(self.norm(hidden_states), past_key_values)
