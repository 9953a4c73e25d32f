"""DPO's pieces (tinyllama.dpo), checked against TRL's DPOTrainer itself: on a fixed batch our
reply log-probs, losses and rewards equal what TRL computes on the same models exported to the
Hugging Face format, to float32 rounding, for the sigmoid loss, IPO and label smoothing."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from tinyllama.chat_template import IGNORE_INDEX, apply_chat_template
from tinyllama.checkpoint import save_checkpoint
from tinyllama.config import JobConfig, RunConfig
from tinyllama.dpo import (
    collate_pairs,
    dpo_loss,
    encode_pair,
    encode_pairs,
    load_reference,
    preference_accuracy,
    sequence_logps,
)
from tinyllama.errors import DataError
from tinyllama.export import export_hf
from tinyllama.model import LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
transformers.logging.set_verbosity_error()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


PAIRS = [
    {
        "prompt": [user("Who is Mia?")],
        "chosen": [assistant("A girl")],
        "rejected": [assistant("A dog in the park")],
    },
    {  # a system prompt and an earlier answer in the prompt: not scored
        "prompt": [
            {"role": "system", "content": "Be brief."},
            user("Where?"),
            assistant("Home"),
            user("And Tom?"),
        ],
        "chosen": [assistant("In a house near the woods")],
        "rejected": [assistant("Nowhere")],
    },
    {
        "prompt": [user("Say hi")],
        "chosen": [assistant("hi")],
        "rejected": [assistant("hello there, my friend")],
    },
]
BETA = 0.3


def tiny_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so the log-probs of the replies differ
        for p in model.parameters():
            p.mul_(10 if p.dim() > 1 else 1)
    return model


@pytest.fixture(scope="module")
def exported(chat_tokenizer, tmp_path_factory):
    """(policy, reference, their transformers copies with TRL's fused head, the HF tokenizer)."""
    from trl.trainer.utils import add_fused_lm_head

    folder = tmp_path_factory.mktemp("dpo_hf")
    ours = tiny_model(chat_tokenizer.vocab_size, 0), tiny_model(chat_tokenizer.vocab_size, 1)
    theirs = []
    for name, model in zip(("policy", "reference"), ours):
        path = export_hf(model, folder / name, tokenizer_path=chat_tokenizer.model_path)
        theirs.append(transformers.AutoModelForCausalLM.from_pretrained(path).eval())
    # What DPOTrainer.__init__ does to its models: the forward that returns per-token log-probs.
    add_fused_lm_head(theirs[0], outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(theirs[1])
    return (*ours, *theirs, transformers.AutoTokenizer.from_pretrained(folder / "policy"))


def trl_example(hf_tokenizer, pair):
    """prompt_ids / chosen_ids / rejected_ids as DPOTrainer tokenizes a conversational pair."""

    def ids(messages, **kw):
        out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        return list(out["input_ids"])

    prompt = ids(pair["prompt"], add_generation_prompt=True)
    example = {"prompt_ids": prompt}
    for reply in ("chosen", "rejected"):
        full = ids(pair["prompt"] + pair[reply])
        assert full[: len(prompt)] == prompt
        example[f"{reply}_ids"] = full[len(prompt) :]
    return example


def trl_loss(policy, reference, examples, loss_type, label_smoothing):
    """DPOTrainer._compute_loss bound to the few attributes it reads: (mean loss, logged metrics)."""
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = types.SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=BETA,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    inputs = trl_dpo.DataCollatorForPreference(pad_token_id=0)(examples)
    with torch.no_grad():
        loss = trl_dpo.DPOTrainer._compute_loss(trainer, policy, inputs, False)
    return loss.item(), {k: v[0] for k, v in trainer._metrics["eval"].items()}


def our_loss(policy, reference, tokenizer, loss_type, label_smoothing):
    batch = collate_pairs([encode_pair(tokenizer, p) for p in PAIRS], pad_id=0)
    with torch.no_grad():
        logps, tokens = sequence_logps(policy, batch)
        ref_logps, _ = sequence_logps(reference, batch)
    (chosen, rejected), (ref_c, ref_r), (n_c, n_r) = logps.chunk(2), ref_logps.chunk(2), tokens.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_c, ref_r, BETA, loss_type, label_smoothing, n_c, n_r
    )
    return losses, chosen_rewards, rejected_rewards, chosen, rejected


# TRL 1.16's "sigmoid" ignores label_smoothing; its conservative-DPO formula (TRL's sigmoid before
# 1.0) lives on in "aot", which sorts the batch's margins: on one pair at a time that is the plain
# margin, so "aot" pair by pair is the oracle of sigmoid with label smoothing.
CASES = [("sigmoid", 0.0, "sigmoid"), ("ipo", 0.0, "ipo"), ("sigmoid", 0.2, "aot")]


@pytest.mark.parametrize("loss_type, label_smoothing, trl_type", CASES)
def test_the_loss_and_rewards_equal_trls_on_the_exported_models(
    exported, chat_tokenizer, loss_type, label_smoothing, trl_type
):
    policy, reference, hf_policy, hf_reference, hf_tokenizer = exported
    examples = [trl_example(hf_tokenizer, p) for p in PAIRS]
    for pair, example in zip(PAIRS, examples):  # TRL's tokenization of the pair is ours
        ours = encode_pair(chat_tokenizer, pair)
        assert example["prompt_ids"] == apply_chat_template(chat_tokenizer, pair["prompt"], True)
        assert ours.chosen[0] == example["prompt_ids"] + example["chosen_ids"]
        assert ours.rejected[0] == example["prompt_ids"] + example["rejected_ids"]
    losses, chosen_rewards, rejected_rewards, chosen, rejected = our_loss(
        policy, reference, chat_tokenizer, loss_type, label_smoothing
    )
    close = dict(rtol=1e-5, atol=1e-5)
    for i, example in enumerate(examples):  # each pair alone (padded alone in TRL, in a batch here)
        loss, m = trl_loss(hf_policy, hf_reference, [example], trl_type, label_smoothing)
        torch.testing.assert_close(losses[i].item(), loss, **close)
        torch.testing.assert_close(chosen_rewards[i].item(), m["rewards/chosen"], **close)
        torch.testing.assert_close(rejected_rewards[i].item(), m["rewards/rejected"], **close)
        torch.testing.assert_close(chosen[i].item(), m["logps/chosen"], **close)
        torch.testing.assert_close(rejected[i].item(), m["logps/rejected"], **close)
    if trl_type != "aot":  # the whole batch at once: the mean loss and the batch's metrics
        loss, m = trl_loss(hf_policy, hf_reference, examples, trl_type, label_smoothing)
        torch.testing.assert_close(losses.mean().item(), loss, **close)
        accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
        assert m["rewards/accuracies"] == accuracy and 0 < accuracy < 1  # both outcomes occur
        torch.testing.assert_close(
            (chosen_rewards - rejected_rewards).mean().item(), m["rewards/margins"], **close
        )


def test_only_the_replys_tokens_are_scored(chat_tokenizer):
    pair = PAIRS[1]
    e = encode_pair(chat_tokenizer, pair)
    prompt = apply_chat_template(chat_tokenizer, pair["prompt"], add_generation_prompt=True)
    for (ids, labels), reply in ((e.chosen, pair["chosen"]), (e.rejected, pair["rejected"])):
        assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}
        assert labels[len(prompt) :] == chat_tokenizer.encode(reply[0]["content"]) + [ids[-1]]  # + <|end|>
    first = encode_pair(chat_tokenizer, PAIRS[0])
    batch = collate_pairs([e, first], pad_id=0)
    # Rows: the chosen replies of both pairs, then their rejected replies, right-padded; the
    # target at t is the label of token t + 1.
    for row, (ids, labels) in enumerate((e.chosen, first.chosen, e.rejected, first.rejected)):
        assert batch.input_ids[row, : len(ids)].tolist() == ids
        assert set(batch.input_ids[row, len(ids) :].tolist()) <= {0}
        assert batch.shift_labels[row].tolist() == labels[1:] + [IGNORE_INDEX] * (
            batch.input_ids.shape[1] - len(ids) + 1
        )


def test_a_pair_longer_than_seq_len_is_refused_naming_it(chat_tokenizer):
    long = {"prompt": [user("word " * 80)], "chosen": [assistant("yes")], "rejected": [assistant("no")]}
    with pytest.raises(
        DataError, match=r"pairs.jsonl:2: the prompt with its longer reply is \d+ tokens.*seq_len=64"
    ):
        encode_pairs(chat_tokenizer, [("pairs.jsonl:1", PAIRS[0]), ("pairs.jsonl:2", long)], seq_len=64)


def test_ipo_needs_token_counts_and_unknown_losses_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="sigmoid or ipo"):
        dpo_loss(x, x, x, x, 0.1, "hinge")
    losses, chosen, rejected = dpo_loss(x, x, x, x, 0.1)
    torch.testing.assert_close(losses, torch.full((2,), 0.6931472))  # log 2 at the start


def test_preference_accuracy_is_zero_at_the_start_and_one_once_the_pairs_are_learnt(chat_tokenizer):
    reference = tiny_model(chat_tokenizer.vocab_size, 0)
    policy = tiny_model(chat_tokenizer.vocab_size, 0)
    start = preference_accuracy(policy, reference, chat_tokenizer, PAIRS, batch_size=2)
    assert (
        start["preference_accuracy"] == 0
        and start["preference_margin"] == 0
        and start["preference_count"] == 3
    )
    assert start["likelihood_accuracy"] == start["reference_likelihood_accuracy"]
    batch = collate_pairs([encode_pair(chat_tokenizer, p) for p in PAIRS], pad_id=0)
    with torch.no_grad():
        ref_c, ref_r = sequence_logps(reference, batch)[0].chunk(2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(10):
        chosen, rejected = sequence_logps(policy.train(), batch)[0].chunk(2)
        optimizer.zero_grad()
        dpo_loss(chosen, rejected, ref_c, ref_r, BETA)[0].mean().backward()
        optimizer.step()
    after = preference_accuracy(policy.eval(), reference, chat_tokenizer, PAIRS)
    assert after["preference_accuracy"] == 1 and after["preference_margin"] > 0
    assert after["logratio_chosen"] > after["logratio_rejected"]
    assert "preference_accuracy_by_question" not in after  # these pairs name no question kind
    kinds = [dict(p, question=q) for p, q in zip(PAIRS, ("who", "where", "who"))]
    by_kind = preference_accuracy(policy.eval(), reference, chat_tokenizer, kinds)
    assert by_kind["preference_accuracy_by_question"] == {"where": 1.0, "who": 1.0}


def test_load_reference_reads_a_run_and_a_hugging_face_folder(chat_tokenizer, tmp_path):
    model = tiny_model(chat_tokenizer.vocab_size, 3)
    job = JobConfig(model=model.config, run=RunConfig(dir=str(tmp_path / "run")))
    meta = {"tokens": 0, "tokenizer_fingerprint": chat_tokenizer.fingerprint}
    save_checkpoint(
        tmp_path / "run" / "checkpoints", 5, model, model.config, job, chat_tokenizer.model_path, meta, None
    )
    export_hf(model, tmp_path / "hf")
    x = torch.randint(0, chat_tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        expected = model(x).logits
        for source in (str(tmp_path / "run"), f"hf:{tmp_path / 'hf'}"):
            reference = load_reference(source)
            assert not reference.training
            torch.testing.assert_close(reference(x).logits, expected)
