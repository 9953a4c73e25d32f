"""The chat template: the ids and label masks of conversations, the refusal of a tokenizer without
the chat pieces, and the round trip through an exported folder in transformers."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tinyllama.chat_template import (
    ASSISTANT_PIECE,
    CHAT_PIECES,
    CHAT_TEMPLATE,
    END_OF_TURN,
    IGNORE_INDEX,
    USER_PIECE,
    add_chat_template,
    apply_chat_template,
    encode_conversation,
    end_of_turn_id,
    missing_pieces,
    require_chat_pieces,
)
from tinyllama.errors import ConfigError, DataError

CONVERSATIONS = [
    [{"role": "user", "content": "Who is the story about?"}, {"role": "assistant", "content": "Mia"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Mia had a red kite.\n\nWhat red thing is in the story?"},
        {"role": "assistant", "content": "kite"},
        {"role": "user", "content": "Who had it?"},
        {"role": "assistant", "content": "Mia"},
    ],
    [
        {"role": "user", "content": "Zoë ate 12 plums at 3:45 — 然后 she slept 😴."},
        {"role": "assistant", "content": "  Two spaces, then 2024 and a tab\tend. "},
    ],
    [{"role": "user", "content": "Say <|end|> and </s> literally."}, {"role": "assistant", "content": ""}],
]


def _piece(tok, piece):
    return tok.sp.piece_to_id(piece)


def test_conversation_ids_mark_turns_with_pieces_and_encode_content_alone(chat_tokenizer):
    tok = chat_tokenizer
    messages = CONVERSATIONS[1]
    ids, labels = encode_conversation(tok, messages)
    expected = [tok.bos_id]
    for m in messages:
        expected += [_piece(tok, f"<|{m['role']}|>")] + tok.encode(m["content"]) + [_piece(tok, END_OF_TURN)]
    assert ids == expected
    assert len(labels) == len(ids)
    assert apply_chat_template(tok, messages) == ids
    assert apply_chat_template(tok, messages[:-1], add_generation_prompt=True) == ids[
        : -(len(tok.encode("Mia")) + 2)
    ] + [_piece(tok, ASSISTANT_PIECE)]
    assert tok.apply_chat_template(messages[:-1], add_generation_prompt=True) == apply_chat_template(
        tok, messages[:-1], add_generation_prompt=True
    )


def test_labels_cover_assistant_content_and_its_end_of_turn_only(chat_tokenizer):
    tok = chat_tokenizer
    ids, labels = encode_conversation(tok, CONVERSATIONS[1])
    end = end_of_turn_id(tok)
    learnt = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert learnt == tok.encode("kite") + [end] + tok.encode("Mia") + [end]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert labels[0] == IGNORE_INDEX  # <s>
    assert _piece(tok, ASSISTANT_PIECE) not in learnt
    ids_all, labels_all = encode_conversation(tok, CONVERSATIONS[1], train_on="all")
    assert ids_all == ids and labels_all == ids


def test_bad_messages_and_options_are_refused_by_name(chat_tokenizer):
    with pytest.raises(DataError, match="role 'bot'.*system, user, assistant"):
        encode_conversation(chat_tokenizer, [{"role": "bot", "content": "hi"}])
    with pytest.raises(DataError, match="content"):
        encode_conversation(chat_tokenizer, [{"role": "user", "content": None}])
    with pytest.raises(ConfigError, match="train_on"):
        encode_conversation(chat_tokenizer, CONVERSATIONS[0], train_on="users")


def test_a_tokenizer_without_the_chat_pieces_is_refused_with_the_fix(tiny_data):
    from tinyllama.tokenizer import ensure_tokenizer

    data, tok_cfg = tiny_data
    base = ensure_tokenizer(
        dataclasses.replace(tok_cfg, name="no_chat_pieces", user_defined_symbols=[]), data
    )
    assert missing_pieces(base) == list(CHAT_PIECES)
    with pytest.raises(ConfigError, match=r"no chat pieces.*user_defined_symbols"):
        require_chat_pieces(base)
    with pytest.raises(ConfigError, match="no chat pieces"):
        base.apply_chat_template(CONVERSATIONS[0])


def test_exported_template_gives_our_ids_in_transformers(chat_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from tinyllama.export import write_hf_tokenizer

    tok = chat_tokenizer
    write_hf_tokenizer(tok.model_path, tmp_path, model_max_length=256)
    add_chat_template(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            got = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            got = got["input_ids"] if hasattr(got, "keys") else got
            assert list(got) == apply_chat_template(tok, messages, add_generation_prompt=prompt), messages
    rendered = theirs.apply_chat_template(CONVERSATIONS[0][:1], add_generation_prompt=True, tokenize=False)
    assert rendered == f"<s>{USER_PIECE}Who is the story about?{END_OF_TURN}{ASSISTANT_PIECE}"
