"""Direct preference optimisation: pairs as model inputs, their log-probabilities, the loss.

    encode_pairs(tokenizer, pairs, seq_len)        token ids and labels of each pair's two rows
    collate_pairs(encoded, pad_id)                 PairBatch: 2B right-padded rows, chosen first
    sequence_logps(model, batch)                   summed log-probs of each row's reply tokens
    dpo_loss(pc, pr, rc, rr, beta, ...)            per-pair losses and implicit rewards (TRL's)
    preference_accuracy(model, reference, ...)     share of held-out pairs the policy ranks right
    load_reference(init_from, device)              the model a DPO run started from

A pair is the prompt followed by the chosen reply in one row and by the rejected reply in another,
each encoded by the chat template (`encode_conversation`), labels IGNORE_INDEX everywhere but on
the reply's assistant content and end-of-turn pieces: exactly the tokens DPO scores. Rows are
right-padded, so a causal model needs no mask (padding only follows the real tokens), and the
chosen and rejected rows of a batch go through one forward pass, as TRL concatenates them.

The loss follows TRL's DPOTrainer (1.16) to float32 rounding, tests/test_dpo.py checks it against
TRL's own code: "sigmoid" is the DPO paper's -log sigmoid(beta x margin); with label_smoothing e
it is conservative DPO, -(1 - e) log sigmoid(beta x margin) - e log sigmoid(-beta x margin) (TRL's
sigmoid loss before 1.0, kept by TRL 1.16 in its "aot" and TPO losses); "ipo" is the IPO paper's
squared loss on the log-ratios averaged per reply token, as TRL computes it.

The evaluate stage uses this module too, so it imports nothing of tinyllama.train.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tinyllama.chat_template import IGNORE_INDEX, encode_conversation
from tinyllama.checkpoint import load_weights
from tinyllama.data.preferences import Pair
from tinyllama.data.sft_batches import padding_id
from tinyllama.errors import DataError
from tinyllama.model import LlamaForCausalLM, causal_lm_loss

Encoded = Tuple[List[int], List[int]]  # (input_ids, labels) of one row, labels not shifted


@dataclass
class EncodedPair:
    """The two rows of a pair: prompt + chosen reply, prompt + rejected reply."""

    chosen: Encoded
    rejected: Encoded


def encode_pair(tokenizer, pair: Pair) -> EncodedPair:
    """Rows of one pair; labels are the reply's assistant tokens (content and `<|end|>`), the prompt's
    (its own assistant turns included) are IGNORE_INDEX. Every message is encoded on its own by
    the template, so the prompt's ids are a prefix of each row's."""
    prompt_len = len(encode_conversation(tokenizer, pair["prompt"])[0])
    rows = []
    for reply in (pair["chosen"], pair["rejected"]):
        input_ids, labels = encode_conversation(tokenizer, list(pair["prompt"]) + list(reply))
        rows.append((input_ids, [IGNORE_INDEX] * prompt_len + labels[prompt_len:]))
    return EncodedPair(*rows)


def encode_pairs(
    tokenizer, pairs: Iterable[Tuple[str, Pair]], seq_len: Optional[int] = None
) -> List[EncodedPair]:
    """encode_pair of each (where, pair); with seq_len, one DataError naming the first pair whose
    prompt and reply do not fit in seq_len tokens (a cut reply would be scored on part of itself)."""
    encoded = []
    for where, pair in pairs:
        e = encode_pair(tokenizer, pair)
        longest = max(len(e.chosen[0]), len(e.rejected[0]))
        if seq_len is not None and longest > seq_len:
            raise DataError(
                f"{where}: the prompt with its longer reply is {longest} tokens, more than "
                f"train.seq_len={seq_len}: raise train.seq_len (up to model.max_position_embeddings), "
                "shorten the prompt, or remove the pair"
            )
        encoded.append(e)
    return encoded


@dataclass
class PairBatch:
    """B pairs as 2B rows: input_ids (2B, T) int64, rows 0..B-1 the chosen replies and B..2B-1
    the rejected ones of the same pairs; shift_labels (2B, T) int64, the target of position t
    (token t + 1 where it is a reply token, else IGNORE_INDEX). ref_logps (2B,) float32: the
    reference's sequence_logps of the rows, when computed ahead (else None)."""

    input_ids: torch.Tensor
    shift_labels: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PairBatch":
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return PairBatch(self.input_ids.to(device), self.shift_labels.to(device), ref)


def collate_pairs(encoded: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    """Stack pairs into 2B rows right-padded to the longest (pad_id, labels IGNORE_INDEX)."""
    rows = [e.chosen for e in encoded] + [e.rejected for e in encoded]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows], dtype=torch.long)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows], dtype=torch.long)
    # Position t predicts token t + 1: shift once here, the model does not shift shift_labels.
    return PairBatch(input_ids, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX))


def sequence_logps(model: nn.Module, batch: PairBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logps (2B,) float32, tokens (2B,) int64): per row, the sum of log p(reply token | what
    precedes it) over its reply tokens, and how many there are. Gradients flow when enabled."""
    logits = model(input_ids=batch.input_ids).logits  # (2B, T, V)
    nats = causal_lm_loss(logits, batch.shift_labels, reduction="none")  # (2B, T) float32, 0 off-reply
    return -nats.sum(dim=1), (batch.shift_labels != IGNORE_INDEX).sum(dim=1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Optional[torch.Tensor] = None,
    rejected_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (B,), chosen_rewards (B,), rejected_rewards (B,)) of B pairs, from the summed reply
    log-probs (B,) of the policy and of the reference. A reward is beta x the log-ratio of policy
    to reference (detached: a figure to log, not a path for gradients). "ipo" needs the replies'
    token counts chosen_tokens, rejected_tokens (B,): it averages the log-ratios per token, as TRL
    does, so that beta (the IPO paper's tau) means the same for short and long replies."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios  # (B,) nats
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
        if label_smoothing:  # the share of labels assumed flipped pulls the other way
            losses = losses - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' averages per token: pass chosen_tokens and rejected_tokens")
        per_token = chosen_logratios / chosen_tokens.clamp(
            min=1
        ) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2  # the IPO paper's eq. 17, tau = beta
    else:
        raise ValueError(f"loss_type={loss_type!r}: choose sigmoid or ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@torch.no_grad()
def pair_logratios(
    model: nn.Module, reference: nn.Module, tokenizer, pairs: Sequence[Pair], batch_size: int = 8
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(policy logps (N, 2), reference logps (N, 2)) of N pairs, columns chosen and rejected."""
    device = next(model.parameters()).device
    pad_id = padding_id(tokenizer)
    encoded = encode_pairs(tokenizer, ((f"pair {i}", p) for i, p in enumerate(pairs)))
    policy, ref = [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[start : start + batch_size], pad_id).to(device)
        for net, out in ((model, policy), (reference, ref)):
            logps = sequence_logps(net, batch)[0].view(2, -1).T  # (b, 2): chosen, rejected
            out.append(logps.float().cpu())
    return torch.cat(policy), torch.cat(ref)


def preference_accuracy(
    model: nn.Module, reference: nn.Module, tokenizer, pairs: Sequence[Pair], batch_size: int = 8
) -> Dict[str, float]:
    """How often the policy prefers the chosen reply relative to the reference, over `pairs`.

    preference_accuracy: the share of pairs whose log-ratio log pi(y|x) - log pi_ref(y|x) is
    higher for the chosen reply than for the rejected (TRL's rewards/accuracies, whatever beta:
    0 at the start, where both ratios are 0); preference_margin: the mean of that difference
    (nats); logratio_chosen / logratio_rejected: the means of each ratio (how far the policy moved
    each way); likelihood_accuracy: the share where the policy alone gives the chosen reply the
    higher log-prob (the reference's own share: reference_likelihood_accuracy); preference_count;
    and where pairs name their question kind ("question", as the built-in pairs do),
    preference_accuracy_by_question. Both models are used as they are (put them in eval mode)."""
    if not pairs:
        raise DataError("preference_accuracy: no pairs to measure")
    policy, ref = pair_logratios(model, reference, tokenizer, pairs, batch_size)
    ratios = policy - ref  # (N, 2)
    margins = ratios[:, 0] - ratios[:, 1]
    result = {
        "preference_accuracy": (margins > 0).float().mean().item(),
        "preference_count": len(pairs),
        "preference_margin": margins.mean().item(),
        "logratio_chosen": ratios[:, 0].mean().item(),
        "logratio_rejected": ratios[:, 1].mean().item(),
        "likelihood_accuracy": (policy[:, 0] > policy[:, 1]).float().mean().item(),
        "reference_likelihood_accuracy": (ref[:, 0] > ref[:, 1]).float().mean().item(),
    }
    kinds = [p.get("question") for p in pairs]
    if any(kinds):
        right = collections.defaultdict(list)
        for kind, margin in zip(kinds, margins.tolist()):
            right[kind or "other"].append(margin > 0)
        result["preference_accuracy_by_question"] = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    return result


def load_reference(init_from: str, device: torch.device | str = "cpu") -> nn.Module:
    """The weights a DPO run started from (its init_from: a run or checkpoint folder, or
    hf:<folder>), as a model in eval mode on `device`: the reference of preference_accuracy."""
    config, state = load_weights(init_from)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model.to(device).eval()
