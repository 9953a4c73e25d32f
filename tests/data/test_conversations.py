"""Reading conversations: the three record shapes from .jsonl, .json, parquet and Hugging Face
datasets (local folders only: the Hub is not reachable in tests), and one clear error per bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tinyllama.data import sources
from tinyllama.data.conversations import load_hf_conversations, read_conversation_files, to_messages
from tinyllama.errors import DataError

MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
}
ALPACA = {"instruction": "Name a color.", "input": "Think of the sky.", "output": "blue"}
PROMPT = {"prompt": "2 + 2 =", "completion": "4", "system": "You add."}
EXPECTED = [
    MESSAGES["messages"],
    [
        {"role": "user", "content": "Name a color.\n\nThink of the sky."},
        {"role": "assistant", "content": "blue"},
    ],
    [
        {"role": "system", "content": "You add."},
        {"role": "user", "content": "2 + 2 ="},
        {"role": "assistant", "content": "4"},
    ],
]


def _hf_cfg(**kw):
    """The DataConfig fields the Hugging Face loader reads."""
    fields = {"hf_name": None, "streaming": False, "source": "hf", "text_field": "text"}
    return SimpleNamespace(**{**fields, **kw})


def test_every_shape_becomes_messages():
    assert [to_messages(r, "x") for r in (MESSAGES, ALPACA, PROMPT)] == EXPECTED
    no_input = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert to_messages(no_input, "x")[0]["content"] == "Say hi."
    conversational = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hey"}],
    }
    assert to_messages(conversational, "x") == conversational["prompt"] + conversational["completion"]


def test_jsonl_json_and_parquet_files_read_alike(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in (MESSAGES, ALPACA, PROMPT)) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps([MESSAGES, ALPACA, PROMPT]))
    pq.write_table(pa.Table.from_pylist([MESSAGES]), tmp_path / "c.parquet")
    pq.write_table(pa.Table.from_pylist([ALPACA]), tmp_path / "d.parquet")
    assert list(read_conversation_files([str(tmp_path / "a.jsonl")])) == EXPECTED
    assert list(read_conversation_files([str(tmp_path / "b.json")])) == EXPECTED
    assert list(read_conversation_files([str(tmp_path / "*.parquet")])) == EXPECTED[:2]


def test_hf_save_to_disk_folder_and_local_data_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list([ALPACA, ALPACA])})
    saved.save_to_disk(tmp_path / "saved")
    assert list(load_hf_conversations(_hf_cfg(), str(tmp_path / "saved"), "train")) == [EXPECTED[1]] * 2
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text(json.dumps(MESSAGES) + "\n")
    assert list(load_hf_conversations(_hf_cfg(), str(tmp_path / "folder"), "train")) == [EXPECTED[0]]


def test_an_unreachable_hub_name_fails_with_advice(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub.*local"):
        list(load_hf_conversations(_hf_cfg(), "someone/chat-data", "train"))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "bot", "content": "hi"}]}, r"f.jsonl:3: message 0 has unknown role 'bot'"),
        ({"messages": []}, r"f.jsonl:3: empty conversation"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"f.jsonl:3: no assistant turn"),
        ({"text": "a story"}, r"f.jsonl:3: none of the recognised fields \(found \['text'\]\).*messages"),
        ({"messages": [{"role": "user"}]}, r"message 0 .* needs 'role' and 'content'"),
        ({"prompt": 3, "completion": "x"}, r"user side is 3"),
        ("just text", r"must be a JSON object"),
        ({"instruction": None, "output": "x"}, r"message 0 \(user\) has content None"),
    ],
)
def test_bad_records_get_one_clear_error_naming_the_row(record, message):
    with pytest.raises(DataError, match=message):
        to_messages(record, "f.jsonl:3")


def test_bad_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    no_reply = {"messages": [{"role": "user", "content": "?"}]}
    bad.write_text(json.dumps(MESSAGES) + "\n" + json.dumps(no_reply) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: no assistant turn"):
        list(read_conversation_files([str(bad)]))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:1 is not valid JSON"):
        list(read_conversation_files([str(tmp_path / "broken.jsonl")]))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"\.jsonl, \.json or \.parquet"):
        list(read_conversation_files([str(tmp_path / "notes.txt")]))
    with pytest.raises(DataError, match="matches no file"):
        list(read_conversation_files([str(tmp_path / "missing*.jsonl")]))
