"""The built-in chat corpus: deterministic, split by story, every short answer copyable from the
conversation it closes, and the story facts agree with the story text."""

from __future__ import annotations

import collections

import pytest

from tinyllama.chat_template import ROLES
from tinyllama.data.synthetic import generate_story, generate_story_with_facts
from tinyllama.data.synthetic_chat import (
    KINDS,
    REPEAT_WORDS,
    chat_example,
    iter_chat_examples,
    repeat_items,
    short_story,
    split_range,
)

SEED = 11


@pytest.fixture(scope="module")
def examples():
    return [chat_example(SEED, i) for i in range(400)]


def test_examples_are_a_pure_function_of_seed_and_index(examples):
    assert chat_example(SEED, 123) == examples[123]
    assert chat_example(SEED + 1, 123) != examples[123]
    assert list(iter_chat_examples("train", 5, SEED)) == examples[:5]


def test_held_out_split_follows_the_train_split_without_overlap():
    train, held_out = split_range("train", 1000), split_range("validation", 1000)
    assert set(train).isdisjoint(held_out) and len(held_out) == 20 and held_out.start == 1000
    assert [e["story_index"] for e in iter_chat_examples("validation", 100, SEED)] == [100, 101]
    with pytest.raises(ValueError, match="split"):
        split_range("test", 10)


def test_story_with_facts_is_the_story_and_names_its_parts():
    for index in range(50):
        story, facts = generate_story_with_facts(SEED, index)
        assert story == generate_story(SEED, index)
        assert facts.hero.name in story and story.endswith(facts.ending)
        assert facts.hero.name != facts.friend.name
        short = short_story(story, facts)
        assert story.startswith(short.rsplit(" ", len(facts.ending.split()))[0])
        assert short.endswith(facts.ending) and short.count("\n") == 1 and len(short) < len(story)


def test_conversations_are_well_formed_and_answers_are_written_in_them(examples):
    kinds = collections.Counter(e["kind"] for e in examples)
    assert set(kinds) == set(KINDS)
    for e in examples:
        messages = e["messages"]
        assert all(m["role"] in ROLES and m["content"] for m in messages)
        assert messages[-1]["role"] == "assistant"
        if e["kind"] in ("write", "repeat"):
            assert e["answer"] is None
            if e["kind"] == "repeat":  # the items come back exactly, in their order
                assert messages[-2]["content"].endswith(": " + messages[-1]["content"])
            continue
        assert e["answer"] == messages[-1]["content"]
        story = short_story(*generate_story_with_facts(SEED, e["story_index"]))
        assert e["answer"] in story, e
        # The story the question is about is in the conversation before the answer.
        assert any(story in m["content"] for m in messages[:-1])


def test_every_question_kind_is_asked(examples):
    asked = collections.Counter(
        e["messages"][-2]["content"].split("\n")[-1].split()[0] for e in examples if e["answer"]
    )
    assert {"Who", "What", "Where", "How", "Is"} <= set(asked)


def test_answer_matching_is_exact_up_to_surrounding_whitespace():
    from tinyllama.data.synthetic_chat import answer_matches

    assert answer_matches(" Mia\n", "Mia")
    assert not answer_matches("mia", "Mia") and not answer_matches("Mia.", "Mia")


def test_repeat_items_are_words_and_places_of_the_stories():
    import random

    from tinyllama.data.synthetic import PLACES

    rng = random.Random(0)
    lists = [repeat_items(rng) for _ in range(200)]
    assert {len(items) for items in lists} == set(range(4, 17))
    items = [item for items in lists for item in items]
    assert set(items) <= set(REPEAT_WORDS) | set(PLACES)
    assert 0.05 < sum(item in PLACES for item in items) / len(items) < 0.15
    assert not any("," in item for item in items)  # no separator token between the items
