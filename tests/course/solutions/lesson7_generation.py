"""Reference solution of lesson 7."""

import torch


def kv_cache_bytes(config, batch_size: int, seq_len: int, bytes_per_value: int) -> int:
    per_layer = 2 * batch_size * config.resolved_num_key_value_heads * seq_len * config.resolved_head_dim
    return per_layer * config.num_hidden_layers * bytes_per_value


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    out = model(input_ids, use_cache=True)
    for _ in range(max_new_tokens):
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        input_ids = torch.cat((input_ids, next_id), dim=1)
        out = model(next_id, past_key_values=out.past_key_values, use_cache=True)
    return input_ids


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
