"""Lesson 9: fine-tuning for chat (SFT).   Read course/en/09-chat.md.

Reference: tinyllama/chat_template.py (encode_conversation), tinyllama/model/masks.py
(segment_attention_mask), tinyllama/data/sft_batches.py (packing).  Grade with:

    python -m tinyllama.course check 9
"""

from typing import Dict, List, Tuple

import torch

from tinyllama.chat_template import END_OF_TURN, IGNORE_INDEX, ROLE_PIECES  # "<|end|>", -100, role -> piece


def encode_conversation(tokenizer, messages: List[Dict[str, str]]) -> Tuple[List[int], List[int]]:
    """messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> (input_ids, labels).

    input_ids: <s>, then for every message its role piece (ROLE_PIECES[role], an id from
    tokenizer.sp.piece_to_id), tokenizer.encode(content) and the END_OF_TURN piece.
    labels: the same length; the token's own id where it carries loss (the model shifts labels
    itself), IGNORE_INDEX elsewhere. Only what the assistant says carries loss: its content and
    its END_OF_TURN (so the model learns to stop), not its role piece.
    """
    raise NotImplementedError


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T): 1, 2, ... for the packed conversations of a window, 0 for padding ->
    boolean mask (B, 1, T, T), True where query t may attend to key s: s <= t and both tokens
    belong to the same conversation. A padding token attends to itself only."""
    raise NotImplementedError
