"""Does a trained model copy from its context? Three probes per run folder, and for a chat run
its held-out accuracy per question.

    python scripts/bench_copy.py runs/demo runs/chat_demo [--stories 60] [--questions]

- names: on held-out synthetic stories (indices from 500000, never in a corpus of fewer
  documents), cut at the run's train.seq_len, how often the argmax at the second and later mentions of the hero's name is the
  name, and its mean log-probability there. The first mention cannot be known; the later ones
  can only be copied. log(1/200) = -5.3 is a uniform guess among the corpus's names.
- context: the mean loss on the second half of those stories given the whole story before each
  token, against the same tokens given only the 8 tokens before them. A model that uses its
  context well has the first far below the second.
- repeat: 40 random tokens, then the same 40 again: the loss on each copy. A model with working
  induction heads has the second far below the first.
- --questions (chat runs on the built-in corpus): answer accuracy per kind of question on the
  held-out split, the breakdown of scripts/evaluate.py's answer_accuracy.

Figures: BENCHMARKS.md, chat.
"""

from __future__ import annotations

import argparse
import collections
from typing import Dict

import torch

from tinyllama.chat import greedy_replies
from tinyllama.checkpoint import build_model, load_checkpoint
from tinyllama.data.synthetic import generate_story_with_facts
from tinyllama.data.synthetic_chat import answer_matches, iter_chat_examples
from tinyllama.tokenizer import Tokenizer

HELD_OUT_STORIES = 500_000
# The last user turn's words that name the kind of question (synthetic_chat.story_questions).
QUESTION_KINDS = {
    "Who is the story about": "who",
    "friend": "friend",
    "kind of animal": "animal",
    "boy or a girl": "boy/girl",
    "live": "where",
    "thing": "thing",
    "food": "food",
    "end": "ending",
}


@torch.no_grad()
def copy_probes(model, tokenizer, seed: int, stories: int, context: int, window: int = 8) -> Dict[str, float]:
    hits = mentions = 0
    logp = full = short = 0.0
    scored = 0
    for index in range(HELD_OUT_STORIES, HELD_OUT_STORIES + stories):
        story, facts = generate_story_with_facts(seed, index)
        ids = tokenizer.encode(story, bos=True)[:context]
        name = tokenizer.encode(facts.hero.name)[0]  # "▁Tara": one piece for every name of the corpus
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
        seen = False
        for t in range(1, len(ids)):
            if ids[t] == name:
                if seen:
                    mentions += 1
                    hits += int(logprobs[t - 1].argmax().item() == name)
                    logp += logprobs[t - 1, name].item()
                seen = True
        for t in range(len(ids) // 2, len(ids) - 1):
            full -= logprobs[t, ids[t + 1]].item()
            alone = model(torch.tensor([ids[t - window + 1 : t + 1]])).logits[0, -1].float()
            short -= alone.log_softmax(-1)[ids[t + 1]].item()
            scored += 1
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, tokenizer.vocab_size - 100, (8, 40), generator=g)
    x = torch.cat([torch.full((8, 1), tokenizer.bos_id), tokens, tokens], dim=1)
    nll = -model(x).logits.float().log_softmax(-1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    return {
        "name_copies": hits,
        "name_mentions": mentions,
        "name_logp": logp / max(mentions, 1),
        "loss_full_context": full / max(scored, 1),
        f"loss_last_{window}": short / max(scored, 1),
        "repeat_first": nll[:, :40].mean().item(),
        "repeat_second": nll[:, 41:].mean().item(),
    }


@torch.no_grad()
def question_accuracy(model, tokenizer, num_docs: int, seed: int) -> Dict[str, str]:
    asked = [c for c in iter_chat_examples("validation", num_docs, seed) if c["answer"] is not None]
    prompts = [c["messages"][:-1] for c in asked]
    limits = [len(tokenizer.encode(c["answer"])) + 4 for c in asked]
    replies = greedy_replies(model, tokenizer, prompts, limits, batch_size=16)
    total, right = collections.Counter(), collections.Counter()
    for c, reply in zip(asked, replies):
        question = c["messages"][-2]["content"].split("\n")[-1]
        kind = next((v for k, v in QUESTION_KINDS.items() if k in question), "other")
        total[kind] += 1
        right[kind] += answer_matches(reply, c["answer"])
    out = {k: f"{right[k]}/{total[k]}" for k in sorted(total)}
    out["all"] = f"{sum(right.values())}/{len(asked)} = {sum(right.values()) / len(asked):.3f}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run folders (or checkpoint folders)")
    parser.add_argument("--stories", type=int, default=60, help="held-out stories for the copy probes")
    parser.add_argument("--questions", action="store_true", help="chat runs: accuracy per question")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for run in args.runs:
        ckpt = load_checkpoint(run, train_state=False)
        model, tokenizer = build_model(ckpt).eval(), Tokenizer.load(ckpt.tokenizer_path)
        data = ckpt.job.data
        story_seed = data.seed if data.source in ("synthetic", "synthetic_chat") else 1234
        context = ckpt.job.train.seq_len  # the length it was trained at: no extrapolation
        probes = copy_probes(model, tokenizer, story_seed, args.stories, context)
        print(
            f"{run}: name copies {probes['name_copies']}/{probes['name_mentions']} "
            f"(log-prob {probes['name_logp']:.2f}); story loss, whole context {probes['loss_full_context']:.3f} "
            f"vs last 8 tokens {probes['loss_last_8']:.3f}; repeated random tokens, first copy "
            f"{probes['repeat_first']:.2f} second {probes['repeat_second']:.2f}"
        )
        if args.questions:
            if data.source != "synthetic_chat":
                print(f"  --questions: {run} was not fine-tuned on data=synthetic_chat; skipped")
                continue
            print("  per question:", question_accuracy(model, tokenizer, data.num_docs, data.seed))


if __name__ == "__main__":
    main()
