"""The chat stage: one streamed reply to `prompt=`, an interactive chat on stdin (history, /reset,
end of input), replies that stop at the end-of-turn token without printing it, the history trimmed
to the context, batched greedy replies equal to one-by-one ones, and a run without the chat pieces
refused with the fix."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyllama.chat import ChatSession, chat_loop, greedy_replies, run_chat
from tinyllama.chat_template import END_OF_TURN, end_of_turn_id
from tinyllama.config import ChatConfig, DataConfig
from tinyllama.errors import ConfigError
from tinyllama.tokenizer import ensure_tokenizer

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Who is the story about?"  # the first taught conversation (conftest.py: taught)


@pytest.fixture
def chat_run(taught, save_chat_run, tmp_path):
    model, tok = taught
    return save_chat_run(
        tmp_path / "chat", model, tok, DataConfig(name="synthetic_chat", source="synthetic_chat")
    )


def test_prompt_mode_streams_one_reply_that_stops_at_end_of_turn(chat_run, taught):
    model, tok = taught
    chat_run.prompt = QUESTION
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(chat_run, out=out, err=err) == ["Mia"]
    assert out.getvalue() == "Mia\n" and END_OF_TURN not in out.getvalue() and err.getvalue() == ""
    # The model does emit <|end|> after the reply: the stage stopped there, it was not cut short.
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    reply = greedy_replies(model, tok, [[{"role": "user", "content": QUESTION}]], 20)
    assert reply == ["Mia"]
    with torch.no_grad():
        full = torch.tensor([ids + tok.encode("Mia")])
        assert model(full).logits[0, -1].argmax().item() == end_of_turn_id(tok)


def test_interactive_chat_keeps_history_resets_and_leaves_at_end_of_input(taught):
    model, tok = taught
    session = ChatSession(model, tok, ChatConfig(max_new_tokens=8))
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO(f"{QUESTION}\n\nAnd then?\n/reset\n{QUESTION}\n")  # then end of input (Ctrl-D)
    replies = chat_loop(session, stdin, out, err)
    assert len(replies) == 3 and replies[0] == replies[2] == "Mia"  # after /reset: as the first time
    assert out.getvalue() == "".join(f"{r}\n" for r in replies)  # what was streamed is what was returned
    assert "(history cleared)" in err.getvalue()
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # only what followed /reset
    session.reply("And then?")
    assert [m["content"] for m in session.history[:3]] == [QUESTION, "Mia", "And then?"]


def test_history_drops_the_oldest_turns_when_the_context_is_full(taught):
    model, tok = taught
    cfg = ChatConfig(max_new_tokens=8, system="You are a helpful assistant.")
    session = ChatSession(model, tok, cfg, context=96)
    turns = [(f"Question number {i} about the story?", f"Answer {i}") for i in range(6)]
    for question, answer in turns:
        session.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    session.history.append({"role": "user", "content": "Who is it about?"})
    ids = session.prompt_ids()
    assert len(ids) <= 96 - 8 and session.dropped > 0
    kept = session.messages()
    assert kept[0] == {"role": "system", "content": cfg.system}  # the system prompt always stays
    assert kept[1]["role"] == "user" and kept[-1]["content"] == "Who is it about?"
    questions = [m["content"] for m in kept[1:-1:2]]
    assert 1 <= len(questions) < len(turns) and session.dropped == len(turns) - len(questions)
    assert questions == [q for q, _ in turns[-len(questions) :]]  # the newest turns are kept
    question, answer = turns[-len(questions) - 1]  # the newest dropped turn
    last_dropped = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    longer = tok.apply_chat_template(kept[:1] + last_dropped + kept[1:], add_generation_prompt=True)
    assert len(longer) > 96 - 8  # one more turn would not have fitted
    assert ids == tok.apply_chat_template(kept, add_generation_prompt=True)
    before = list(session.history)
    with pytest.raises(ConfigError, match="write a shorter message or lower chat.max_new_tokens"):
        session.reply("Once upon a time " * 20)
    assert session.history == before  # the refused message is not kept, the history is
    with pytest.raises(ConfigError, match="lower chat.max_new_tokens"):
        ChatSession(model, tok, ChatConfig(max_new_tokens=48), context=48)


def test_batched_greedy_replies_equal_one_by_one_replies(taught, taught_conversations):
    model, tok = taught
    conversations = [c[:-1] for c in taught_conversations] + [
        [{"role": "user", "content": "Tell me a story."}]
    ]
    batched = greedy_replies(model, tok, conversations, [4, 10, 6], batch_size=3)
    alone = [greedy_replies(model, tok, [c], n)[0] for c, n in zip(conversations, [4, 10, 6])]
    assert batched == alone and batched[:2] == ["Mia", "in a small town"]


def test_a_run_without_the_chat_pieces_is_refused_with_the_fix(
    tiny_data, tmp_path, save_chat_run, tiny_chat_model
):
    data, tok_cfg = tiny_data
    plain = ensure_tokenizer(
        dataclasses.replace(tok_cfg, name="no_chat_pieces", user_defined_symbols=[]), data
    )
    job = save_chat_run(tmp_path / "plain", tiny_chat_model(plain.vocab_size), plain, data)
    job.prompt = "Hello"
    with pytest.raises(ConfigError, match="cannot chat: .*no chat pieces.*user_defined_symbols"):
        run_chat(job, out=io.StringIO())


def test_chat_script_replies_once_and_exits(chat_run, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "chat.py"),
            f"run.dir={chat_run.run.dir}",
            f"prompt={QUESTION}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Mia\n"
