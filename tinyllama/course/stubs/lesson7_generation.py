"""Lesson 7: KV cache and sampling.   Read course/en/07-generation.md.

Reference: tinyllama/model/cache.py (KVCache), tinyllama/generate.py (generate, next_token,
_top_p_filter, which filters probabilities rather than logits).  Grade with:

    python -m tinyllama.course check 7
"""

import torch

from tinyllama.model import KVCache, LlamaConfig, LlamaForCausalLM


def kv_cache_bytes(config: LlamaConfig, batch_size: int, seq_len: int, bytes_per_value: int) -> int:
    """Memory of a KV cache holding seq_len positions for batch_size sequences.

    Per layer the cache stores keys and values of shape (B, KV, S, D), KV key/value heads
    (config.resolved_num_key_value_heads), D = config.resolved_head_dim.
    """
    raise NotImplementedError


@torch.no_grad()
def greedy_generate(model: LlamaForCausalLM, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + max_new_tokens): append the argmax token max_new_tokens times.

    Use the KV cache: one call on the whole prompt with use_cache=True (the prefill), then each
    step feeds ONLY the newest token (B, 1) with past_key_values=out.past_key_values; the model
    places it at the position after the cached ones. out.logits is (B, T_fed, V).
    """
    raise NotImplementedError


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (B, V) -> (B, V): keep the k largest logits of each row, set the others to -inf
    (ties with the k-th largest are kept)."""
    raise NotImplementedError


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits (B, V) -> (B, V), nucleus filtering: keep the smallest set of most likely tokens
    whose probabilities sum to >= p, set the others to -inf. The most likely token always stays;
    a token stays if the probabilities of the tokens ranked above it sum to less than p."""
    raise NotImplementedError
