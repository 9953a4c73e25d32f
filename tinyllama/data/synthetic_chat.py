"""The built-in chat corpus: conversations about the synthetic stories, offline and deterministic.

Example `index` of the corpus with a seed is built from story `index` of the synthetic story
corpus with that seed (a pure function of both, like the stories), shortened by `short_story`
to fit the demo model's context. Kinds:

- "question": the user gives a story and asks who it is about, who the friend is, what kind of
  child or animal the hero is, where the hero lives, which thing or food is in it, or how it
  ends; the reply is a short answer copied from the story, checkable by exact match;
- "follow_up": the same with a second question in a second user turn;
- "write": the user asks for a story about a named hero and friend; the reply is the story;
- "write_follow_up": a story is written, then a question about it is answered;
- "repeat": the user gives a list of words and phrases from the stories (names, animals, things,
  foods, colours, places) in random order and asks for them back; the reply repeats them.

"repeat" is a drill, not a skill anyone needs: it is there because answering a question about a
story means copying a word from the context, and a small base model pretrained for a few minutes
has not learnt to copy (its story loss is nearly that of an 8-token window). A random list can
be predicted only by copying, so these replies give the copying circuit (induction heads) a
strong, clean signal that the story questions alone are too sparse to give; with it the
questions are answered (BENCHMARKS.md, chat). Items are joined by spaces: a separator such as a
comma would follow every item, so matching on the previous token could not tell where in the
list the copy is.

Every example holds the expected `answer` of its last turn where that is a short answer (None
for "write" and "repeat") and the kind of that `question` (QUESTION_KINDS), so an evaluation can prompt with all messages but the last and
compare the greedy reply with it (`answer_matches`). The train split is examples
0..num_docs-1, the held-out split the next max(1, num_docs // 50): held-out stories are never
trained on.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from tinyllama.data.synthetic import (
    ANIMALS,
    BOYS,
    COLORS,
    FOODS,
    GIRLS,
    PLACES,
    THINGS,
    StoryFacts,
    generate_story_with_facts,
)

# Stored with the packed corpus: a change to what the generator yields for a (seed, index) bumps
# it, so that windows packed by an older generator are refused instead of silently reused.
VERSION = 2
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You answer questions about stories in a few words."]
# Shares of the kinds, in this order: question, follow_up, write, write_follow_up, repeat.
KINDS = ("question", "follow_up", "write", "write_follow_up", "repeat")
KIND_WEIGHTS = (0.3, 0.1, 0.05, 0.05, 0.5)
REPEAT_WORDS = GIRLS + BOYS + ANIMALS + THINGS + FOODS + COLORS
REPEAT_REQUESTS = ["Repeat these words: {}", "Say these words back to me: {}", "Please repeat after me: {}"]
SPLITS = ("train", "validation")

# {"messages": [...], "answer": str | None, "question": one of QUESTION_KINDS | None, "kind": str,
#  "story_index": int}: "answer" and "question" belong to the last turn.
Example = Dict[str, object]


def split_range(split: str, num_docs: int) -> range:
    """Example indices of a split: train 0..num_docs-1, validation the next max(1, num_docs // 50)."""
    if split == "train":
        return range(num_docs)
    if split == "validation":
        return range(num_docs, num_docs + max(1, num_docs // 50))
    raise ValueError(f"split {split!r}: use one of {SPLITS}")


def iter_chat_examples(split: str, num_docs: int, seed: int) -> Iterator[Example]:
    """The examples of one split (see `split_range`), in index order."""
    for index in split_range(split, num_docs):
        yield chat_example(seed, index)


def chat_example(seed: int, index: int) -> Example:
    """Example `index` of the chat corpus with this seed."""
    story, facts = generate_story_with_facts(seed, index)
    story = short_story(story, facts)
    rng = random.Random(f"chat:{seed}:{index}")  # its own stream: the story's stays untouched
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    questions = story_questions(story, facts)
    messages: List[Dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    answer: Optional[str] = None
    question_kind: Optional[str] = None
    if kind == "repeat":
        items = " ".join(repeat_items(rng))
        messages += [
            {"role": "user", "content": rng.choice(REPEAT_REQUESTS).format(items)},
            {"role": "assistant", "content": items},
        ]
    elif kind in ("question", "follow_up"):
        asked = rng.sample(questions, 2 if kind == "follow_up" else 1)
        question_kind, question, answer = asked[0]
        messages += [
            {"role": "user", "content": f"{story}\n\n{question}"},
            {"role": "assistant", "content": answer},
        ]
        question_kind = asked[-1][0]  # the last turn's
        for _, question, answer in asked[1:]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    else:
        messages += [
            {"role": "user", "content": write_request(rng, facts)},
            {"role": "assistant", "content": story},
        ]
        if kind == "write_follow_up":
            question_kind, question, answer = rng.choice(questions)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {
        "messages": messages,
        "answer": answer,
        "question": question_kind,
        "kind": kind,
        "story_index": index,
    }


def short_story(story: str, facts: StoryFacts) -> str:
    """The story without the second half of its plot: the opening paragraph, the first half of the
    plot and the ending sentence (about 85 tokens with bpe_4k instead of 145), so that a story,
    its questions and answers fit in the context that the demo model was pretrained on (128)."""
    opening, first_half = story.split("\n")[:2]
    return f"{opening}\n{first_half} {facts.ending}"


QUESTION_KINDS = ("who", "animal", "boy/girl", "ending", "friend", "where", "thing", "food")
"""The kinds of question (an example's "question"), for accuracy per kind."""


def story_questions(story: str, facts: StoryFacts) -> List[Tuple[str, str, str]]:
    """(kind, question, short answer) triples whose answer is written in the story (so it can be
    copied); kind is one of QUESTION_KINDS."""
    hero, friend = facts.hero, facts.friend
    if hero.kind in ANIMALS:
        kind = ("animal", f"What kind of animal is {hero.name}?", hero.kind)
    else:
        kind = ("boy/girl", f"Is {hero.name} a boy or a girl?", hero.kind)
    triples = [
        ("who", "Who is the story about?", hero.name),
        kind,  # every opening names both
        ("ending", "How does the story end?", facts.ending),
    ]
    checks: List[Tuple[str, str, str, Callable[[], bool]]] = [
        ("friend", f"Who is {hero.name}'s friend?", friend.name, lambda: friend.name in story),
        ("where", f"Where does {hero.name} live?", facts.place, lambda: facts.place in story),
        (
            "thing",
            f"What {facts.color} thing is in the story?",
            facts.thing,
            lambda: f"{facts.color} {facts.thing}" in story,
        ),
        # A bake story names two foods, so "which food" has no single answer there.
        (
            "food",
            "What food is in the story?",
            facts.food,
            lambda: facts.food in story and facts.plot != "bake",
        ),
    ]
    return triples + [(k, q, a) for k, q, a, present in checks if present()]


def repeat_items(rng: random.Random) -> List[str]:
    """4 to 16 words of the stories' lists in random order, one in ten a place's phrase instead."""
    count = rng.randint(4, 16)
    return [rng.choice(PLACES) if rng.random() < 0.1 else rng.choice(REPEAT_WORDS) for _ in range(count)]


def write_request(rng: random.Random, facts: StoryFacts) -> str:
    hero, friend = facts.hero, facts.friend
    return rng.choice(
        [
            f"Write a short story about {hero.name} and {friend.name}.",
            f"Tell me a story about a {hero.kind} named {hero.name}.",
            f"Please write a children's story about {hero.name}, with {friend.name} in it.",
        ]
    )


def answer_matches(reply: str, answer: str) -> bool:
    """The exact-match rule of answer accuracy: the reply, stripped of surrounding whitespace, is
    the expected short answer (case and punctuation count)."""
    return reply.strip() == answer
