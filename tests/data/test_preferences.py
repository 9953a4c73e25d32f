"""Preference pairs: TRL's and minimind's shapes from .jsonl, .json, parquet and Hugging Face
folders; the built-in pairs of the chat corpus; one clear error per bad record."""

from __future__ import annotations

import json

import pytest

from tinyllama.config import DataConfig, DPOConfig
from tinyllama.data import synthetic_chat
from tinyllama.data.preferences import builtin_pairs, iter_pairs, preference_pairs, read_pair_files, to_pair
from tinyllama.data.synthetic import generate_story_with_facts
from tinyllama.errors import DataError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONAL = {"prompt": [user("Who?")], "chosen": [assistant("Mia")], "rejected": [assistant("Tom")]}
IMPLICIT = {  # minimind's DPO files, TRL's implicit prompt: whole conversations sharing the prompt
    "chosen": [user("Who?"), assistant("Mia")],
    "rejected": [user("Who?"), assistant("Tom")],
}
STANDARD = {"prompt": "Who?", "chosen": "Mia", "rejected": "Tom"}
EXPECTED = {"prompt": [user("Who?")], "chosen": [assistant("Mia")], "rejected": [assistant("Tom")]}


def test_every_shape_becomes_the_same_pair_and_extra_columns_stay():
    for record in (CONVERSATIONAL, IMPLICIT, STANDARD):
        assert to_pair(record, "r") == EXPECTED
    system = to_pair({**STANDARD, "system": "Be brief.", "score": 0.9}, "r")
    assert system["prompt"] == [{"role": "system", "content": "Be brief."}, user("Who?")]
    assert system["score"] == 0.9 and "system" not in system
    # A longer shared prefix is the prompt, earlier answers included.
    long = {k: [user("Hi"), assistant("Hello"), *v] for k, v in IMPLICIT.items()}
    assert to_pair(long, "r")["prompt"] == [user("Hi"), assistant("Hello"), user("Who?")]


def test_jsonl_json_and_parquet_files_read_alike(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps(r) for r in (CONVERSATIONAL, IMPLICIT, STANDARD)) + "\n"
    )
    (tmp_path / "b.json").write_text(json.dumps([CONVERSATIONAL, IMPLICIT, STANDARD]))
    pq.write_table(pa.Table.from_pylist([STANDARD, STANDARD]), tmp_path / "c.parquet")
    pq.write_table(pa.Table.from_pylist([CONVERSATIONAL]), tmp_path / "d.parquet")
    for pattern, count in (("a.jsonl", 3), ("b.json", 3), ("*.parquet", 3)):
        pairs = list(read_pair_files([str(tmp_path / pattern)]))
        assert [p for _, p in pairs] == [EXPECTED] * count
    assert [w for w, _ in read_pair_files([str(tmp_path / "a.jsonl")])][2].endswith("a.jsonl:3")


def test_splits_of_files_and_of_a_hugging_face_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{**STANDARD, "chosen": f"Mia {i}"} for i in range(200)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    data = DataConfig(name="synthetic_chat", source="synthetic_chat", val_fraction=0.1, seed=3)
    dpo = DPOConfig(train_files=[str(tmp_path / "train.jsonl")])
    train, val = (preference_pairs(dpo, data, s) for s in ("train", "val"))
    assert len(train) + len(val) == 200 and 5 < len(val) < 40  # a held-out fraction, disjoint
    assert not {p["chosen"][0]["content"] for p in train} & {p["chosen"][0]["content"] for p in val}
    dpo.val_files = [str(tmp_path / "train.jsonl")]
    assert len(preference_pairs(dpo, data, "train")) == len(preference_pairs(dpo, data, "val")) == 200
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([IMPLICIT] * 3), "test": datasets.Dataset.from_list([STANDARD])}
    )
    saved.save_to_disk(tmp_path / "saved")
    hf = DPOConfig(hf_path=str(tmp_path / "saved"))
    data.hf_val_split = "test"
    assert preference_pairs(hf, data, "train") == [EXPECTED] * 3
    assert [w for w, _ in iter_pairs(hf, data, "val")] == [f"dataset {tmp_path / 'saved'} split 'test' row 0"]


def test_the_builtin_pairs_are_wrong_answers_from_the_same_story():
    pairs = list(builtin_pairs(200, 7, "train"))
    asked = [e for e in synthetic_chat.iter_chat_examples("train", 200, 7) if e["answer"] is not None]
    assert len(pairs) == len(asked) and pairs == list(builtin_pairs(200, 7, "train"))  # deterministic
    kinds = {p["question"] for _, p in pairs}
    assert kinds == set(synthetic_chat.QUESTION_KINDS)
    for (_, pair), example in zip(pairs, asked):
        assert pair["prompt"] == example["messages"][:-1] and pair["chosen"] == [example["messages"][-1]]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert rejected != chosen and pair["rejected"][0]["role"] == "assistant"
        facts = generate_story_with_facts(7, pair["story_index"])[1]
        if pair["question"] == "who":
            assert (chosen, rejected) == (facts.hero.name, facts.friend.name)
        elif pair["question"] == "friend":
            assert (chosen, rejected) == (facts.friend.name, facts.hero.name)
        elif pair["question"] == "boy/girl":
            assert {chosen, rejected} == {"boy", "girl"}
        elif pair["question"] == "ending" and facts.hero.name in chosen:
            assert rejected == chosen.replace(facts.hero.name, facts.friend.name)
    assert list(builtin_pairs(200, 8, "train")) != pairs  # another seed, other stories


def test_the_builtin_held_out_pairs_come_from_the_held_out_stories():
    data = DataConfig(name="synthetic_chat", source="synthetic_chat", num_docs=500, seed=1)
    train, val = (preference_pairs(DPOConfig(), data, s) for s in ("train", "val"))
    assert {p["story_index"] for p in val} <= set(synthetic_chat.split_range("validation", 500))
    assert max(p["story_index"] for p in train) < 500 and val
    with pytest.raises(DataError, match="dpo.train_files"):  # other conversations have no built-in pairs
        preference_pairs(DPOConfig(), DataConfig(name="c", source="chat_files"), "train")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "Who?", "chosen": "Mia"}, r"r: missing rejected"),
        ({"prompt": "Who?"}, r"r: missing chosen and rejected"),
        ({**STANDARD, "chosen": None}, r"r: missing chosen"),
        ({**STANDARD, "chosen": "Tom"}, r"r: chosen and rejected are the same reply"),
        ({**STANDARD, "rejected": " "}, r"r: the rejected reply is empty"),
        ({**CONVERSATIONAL, "chosen": []}, r"r: the chosen reply is empty"),
        ({**CONVERSATIONAL, "chosen": [user("Mia")]}, r"r: the chosen reply is empty \(no assistant turn"),
        (
            {**CONVERSATIONAL, "rejected": [{"role": "bot", "content": "x"}]},
            r"r: rejected: message 0 has unknown role",
        ),
        ({**CONVERSATIONAL, "prompt": 3}, r"r: prompt is 3: give a string or a list of messages"),
        ({"chosen": "Mia", "rejected": "Tom"}, r"r: no prompt, and chosen/rejected are not conversations"),
        (
            {"chosen": IMPLICIT["chosen"], "rejected": IMPLICIT["chosen"]},
            r"r: chosen and rejected are the same",
        ),
        (["not", "a", "record"], r"r: a record must be a JSON object"),
    ],
)
def test_bad_records_get_one_clear_error_naming_the_row(record, message):
    with pytest.raises(DataError, match=message):
        to_pair(record, "r")


def test_a_bad_file_row_and_an_empty_split_are_named(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        json.dumps(STANDARD) + "\n" + json.dumps({**STANDARD, "rejected": ""}) + "\n"
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2: the rejected reply is empty"):
        list(read_pair_files([str(tmp_path / "p.jsonl")]))
    (tmp_path / "one.jsonl").write_text(json.dumps(STANDARD) + "\n")
    data = DataConfig(name="c", source="chat_files", val_fraction=0.0)
    with pytest.raises(DataError, match="the val split of the preference pairs is empty"):
        preference_pairs(DPOConfig(train_files=[str(tmp_path / "one.jsonl")]), data, "val")
