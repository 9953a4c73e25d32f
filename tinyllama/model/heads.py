"""Task heads on the backbone: next-token prediction and sequence classification.

Also the causal-LM loss, defined once (`causal_lm_loss`; `chunked_causal_lm_loss` sums it over
chunks of positions, evaluation reads it per token), and the causal LM's FLOPs per token, which
the train loop's MFU and the inspect stage read (`LlamaForCausalLM.flops_per_token`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinyllama.model.cache import KVCache
from tinyllama.model.config import LlamaConfig
from tinyllama.model.modeling import LlamaModel, LlamaPreTrainedModel, ModelParts


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor]
    """(B, T, V): unnormalised scores of the next token at every position ((B, k, V) with
    logits_to_keep=k). None when the loss was computed in chunks (`model.chunked_loss` on and
    targets given): see LlamaForCausalLM."""
    loss: Optional[torch.Tensor] = None
    """Scalar, when labels or shift_labels were given."""
    past_key_values: Optional[KVCache] = None
    """The updated cache (use_cache=True), to pass to the next call."""


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor
    """(B, num_labels), read at each row's last non-pad token."""
    loss: Optional[torch.Tensor] = None
    """Scalar, when labels were given."""
    past_key_values: Optional[KVCache] = None
    """The updated cache (use_cache=True)."""


def causal_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy in float32 of logits (B, T, V) against ALREADY-ALIGNED targets (B, T):
    targets[b, t] is the token that should follow position t; targets equal to ignore_index
    count for nothing. The one definition of the causal-LM loss: the train loop gets it as
    model(x, shift_labels=y).loss, the chunked loss sums it chunk by chunk, evaluation reads it
    per token. reduction: "mean" over the non-ignored targets, "sum", or "none": (B, T), one
    loss per target, 0 where ignored."""
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss.view_as(targets) if reduction == "none" else loss


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    chunk_tokens: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """causal_lm_loss(lm_head(hidden_states), targets), same value and gradients, without ever
    holding the (B, T, V) logits: hidden_states (B, T, C), targets (B, T) already aligned.

    Why: at V = 32000 the float32 logits, the log-softmax and the logits' gradient are ~3x
    B*T*V*4 bytes (3 GB at 32 x 256 tokens), more than all the layers' activations, so
    checkpointing the layers alone saves little. Here each chunk of `chunk_tokens` positions goes
    through lm_head + a summed cross-entropy inside a checkpoint: forward keeps only the scalar,
    backward recomputes that chunk's logits, so at most one chunk's (chunk_tokens, V) exists."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (N, C), (N,) -> summed CE
        return causal_lm_loss(lm_head(h), t, ignore_index, reduction="sum")

    hidden, flat_targets = hidden_states.reshape(-1, hidden_states.shape[-1]), targets.reshape(-1)
    total = sum(
        checkpoint(chunk_loss, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(chunk_tokens), flat_targets.split(chunk_tokens))
    )
    return total / (flat_targets != ignore_index).sum()  # mean over the non-ignored targets


TIED_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def drop_tied_head(state: Dict[str, torch.Tensor], config: LlamaConfig) -> Dict[str, torch.Tensor]:
    """The state_dict to store: a tied lm_head.weight is the embedding tensor itself, so files
    (ours and Hugging Face's) keep it once, under the embedding's name."""
    return {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == TIED_HEAD)}


def restore_tied_head(state: Dict[str, torch.Tensor], config: LlamaConfig) -> Dict[str, torch.Tensor]:
    """Inverse of drop_tied_head: a state_dict that load_state_dict(strict=True) accepts."""
    if config.tie_word_embeddings and TIED_HEAD not in state and EMBEDDING in state:
        state = {**state, TIED_HEAD: state[EMBEDDING]}
    return state


class LlamaForCausalLM(LlamaPreTrainedModel):
    """Backbone + lm_head (C -> V). With tie_word_embeddings the head reuses the embedding
    matrix (one (V, C) tensor, saving V*C parameters), as small Llamas and Qwen2 do.

    Set `chunked_loss = True` to compute the loss without ever holding the (B, T, V) logits
    (chunked_causal_lm_loss, `loss_chunk_tokens` positions at a time): a call with targets then
    returns logits=None. The training model turns it on together with gradient checkpointing
    (train/build.py), where the logits would otherwise dominate the memory left."""

    def __init__(self, config: LlamaConfig, parts: ModelParts = ModelParts()) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, parts)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.chunked_loss = False
        self.loss_chunk_tokens = 1024
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        shift_labels: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, V), and the causal-LM loss given either of:
        labels (B, T): the inputs themselves (-100 to ignore a position), shifted here so position
            t is scored on token t + 1;
        shift_labels (B, T): targets already aligned (no shift), e.g. the loader's y; the name of
            transformers' loss keyword for the same thing.
        logits_to_keep: 0 for every position, k for the last k only (transformers' name and
            meaning): logits (B, k, V), and the loss over those k positions; generation asks for
            1, so a prefill runs the (C -> V) head once per row, not T times.
        With `chunked_loss` on and targets given, logits is None (see the class). The other
        arguments are LlamaModel.forward's."""
        if labels is not None and shift_labels is not None:
            raise ValueError("pass labels (shifted here) or shift_labels (already aligned), not both")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep}: 0 keeps every position, k > 0 the last k")
        if labels is not None:
            # Shift left and pad the end with ignore: targets stay (B, T), no copy of the logits.
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        kept = slice(-logits_to_keep, None)  # 0 -> slice(0, None): every position
        hidden_states = out.last_hidden_state[:, kept]  # (B, T or k, C)
        if shift_labels is not None:
            shift_labels = shift_labels[:, kept]
            if self.chunked_loss:
                loss = chunked_causal_lm_loss(
                    hidden_states, self.lm_head, shift_labels, self.loss_chunk_tokens
                )
                return CausalLMOutput(None, loss, out.past_key_values)
        logits = self.lm_head(hidden_states)
        loss = None if shift_labels is None else causal_lm_loss(logits, shift_labels)
        return CausalLMOutput(logits, loss, out.past_key_values)

    def flops_per_token(self, seq_len: int) -> Dict[str, int]:
        """FLOPs per token at sequence length T = seq_len (a multiply-add counts as 2 FLOPs):

            N        = num_parameters(exclude_embeddings=True), plus the lm_head when it is tied:
                       the embedding lookup is free, the (C -> V) head matmul is not (nanoGPT
                       counts it the same way)
            forward  = 2 N + 4 L H D T'      2 N: every weight multiplies every token once;
                                             4 L H D T': Q K^T and softmax(.) V, 2 H D T' each per layer
            training = 6 N + 12 L H D T'     backward costs twice the forward (grads of inputs and weights)

        L layers, H query heads of width D, T' = T (or the sliding window, where smaller). Like
        PaLM's appendix B and nanoGPT's MFU, the attention term counts the full T x T score matrix
        although the causal mask makes half of it useless work; norms, softmax and SiLU are ignored
        (a few % at most). The train loop divides training x tokens/s by the hardware peak (MFU).

        Returns forward, training, n (the N of 6N), attention_forward (the 4 L H D T' part of
        forward) and seq_len."""
        config = self.config
        n = self.num_parameters(exclude_embeddings=True)
        if self.lm_head.weight is self.model.embed_tokens.weight:
            n += self.lm_head.weight.numel()
        attention = 0
        for layer in range(config.num_hidden_layers):
            context = min(seq_len, config.sliding_window) if config.uses_sliding_window(layer) else seq_len
            attention += 4 * config.num_attention_heads * config.resolved_head_dim * context
        return {
            "forward": 2 * n + attention,
            "training": 6 * n + 3 * attention,
            "n": n,
            "attention_forward": attention,
            "seq_len": seq_len,
        }


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    """Backbone + score head (C -> num_labels) read at each row's last non-pad token: with
    causal attention, only the last token has seen the whole sequence."""

    def __init__(self, config: LlamaConfig, parts: ModelParts = ModelParts()) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, parts)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
    ) -> SequenceClassifierOutput:
        """input_ids (B, T) -> logits (B, num_labels). labels: (B,) class ids (single-label),
        (B, num_labels) floats (multi-label, or regression), or (B,) floats (regression, 1 label)."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        bsz = input_ids.shape[0]
        if self.config.pad_token_id is None:
            if bsz != 1:
                raise ValueError(
                    "sequence classification of a batch needs config.pad_token_id "
                    "to find each row's last token"
                )
            last = torch.full((1,), input_ids.shape[1] - 1, device=logits.device)
        else:
            # Rightmost non-pad index: works for left and right padding alike.
            not_pad = (input_ids != self.config.pad_token_id).int()
            last = (torch.arange(input_ids.shape[1], device=logits.device) * not_pad).argmax(-1)
        pooled = logits[torch.arange(bsz, device=logits.device), last]  # (B, num_labels)
        loss = None if labels is None else sequence_classification_loss(pooled, labels, self.config)
        return SequenceClassifierOutput(pooled, loss, out.past_key_values)


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, config: LlamaConfig
) -> torch.Tensor:
    """transformers' rule: problem_type, or inferred from num_labels and the labels' dtype:
    1 label -> regression (MSE); integer labels -> single-label (CE); else multi-label (BCE)."""
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)
