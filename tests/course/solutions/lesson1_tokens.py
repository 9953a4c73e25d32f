"""Reference solution of lesson 1."""

from typing import List, Sequence, Tuple

import torch


def ids_and_pieces(tokenizer, text: str) -> List[Tuple[int, str]]:
    return [(i, tokenizer.sp.id_to_piece(i)) for i in tokenizer.encode(text)]


def bytes_per_token(tokenizer, texts: Sequence[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / sum(len(tokenizer.encode(t)) for t in texts)


def embed(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight[input_ids]


def tied_logits(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden_states @ weight.T
