"""Reference solution of lesson 9."""

from typing import Dict, List, Tuple

import torch

from tinyllama.chat_template import END_OF_TURN, IGNORE_INDEX, ROLE_PIECES


def encode_conversation(tokenizer, messages: List[Dict[str, str]]) -> Tuple[List[int], List[int]]:
    end = tokenizer.sp.piece_to_id(END_OF_TURN)
    input_ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for message in messages:
        role = tokenizer.sp.piece_to_id(ROLE_PIECES[message["role"]])
        body = tokenizer.encode(message["content"]) + [end]
        input_ids += [role] + body
        if message["role"] == "assistant":
            labels += [IGNORE_INDEX] + body
        else:
            labels += [IGNORE_INDEX] * (1 + len(body))
    return input_ids, labels


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, None, :]
    return ((same & causal & real) | torch.eye(t, dtype=torch.bool))[:, None]
