"""Lesson 1: tokens and embeddings.   Read course/en/01-tokens.md (Chinese: course/zh/01-tokens.md).

Reference: tinyllama/tokenizer.py (Tokenizer: a SentencePiece model, `tokenizer.sp`), and in
tinyllama/model/: LlamaModel.embed_tokens (nn.Embedding, modeling.py) and LlamaForCausalLM.lm_head
(heads.py), which shares the embedding matrix when tie_word_embeddings is true.  Grade with:

    python -m tinyllama.course check 1
"""

from typing import List, Sequence, Tuple

import torch

from tinyllama.tokenizer import Tokenizer


def ids_and_pieces(tokenizer: Tokenizer, text: str) -> List[Tuple[int, str]]:
    """Encode `text` (no BOS/EOS) and pair each id with its piece, e.g. [(412, "▁Once"), ...].

    tokenizer.encode(text) gives the ids; tokenizer.sp.id_to_piece(i) gives a piece's text
    ("▁" marks a leading space; "<0x0A>" is a byte-fallback piece).
    """
    raise NotImplementedError


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Compression of the tokenizer on `texts`: total UTF-8 bytes / total tokens (no BOS/EOS)."""
    raise NotImplementedError


def embed(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """input_ids (B, T) int64, weight (V, C) -> (B, T, C): row input_ids[b, t] of the table.

    Without calling nn.Embedding or F.embedding: an embedding lookup is just indexing.
    """
    raise NotImplementedError


def tied_logits(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden_states (B, T, C), embedding weight (V, C) -> logits (B, T, V).

    With tied embeddings the LM head is a Linear(C -> V) whose weight IS the embedding table: the
    logit of token v is the dot product of the hidden state with token v's embedding.
    """
    raise NotImplementedError
