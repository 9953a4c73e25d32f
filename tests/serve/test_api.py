"""The server through the official `openai` client and plain HTTP: replies equal scripts/chat.py's
greedy reply, streamed and not; usage and finish reasons; every bad request gets OpenAI's error
object and the server goes on; a client that leaves mid-stream frees its rows; 16 concurrent
clients all get their replies."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tinyllama.chat import ChatSession
from tinyllama.config import ChatConfig

openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")

REPO = Path(__file__).resolve().parents[2]
QUESTION = "Who is the story about?"  # taught: replies "Mia"


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_reply(taught, text: str, max_new_tokens: int = 16) -> str:
    model, tok = taught
    return ChatSession(model, tok, ChatConfig(max_new_tokens=max_new_tokens, temperature=0.0)).reply(text)


def test_models_and_health(client, live):
    assert [m.id for m in client.models.list().data] == ["taught"]
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["chat"] is True and health["context"] == 128


def test_chat_completion_equals_the_chat_stage_greedy_reply(client, taught, taught_conversations):
    for conversation in taught_conversations:
        question = conversation[-2]["content"]
        expected = chat_reply(taught, question) if len(conversation) == 2 else None
        r = client.chat.completions.create(
            model="taught", messages=conversation[:-1], temperature=0, max_tokens=16
        )
        assert r.choices[0].message.content == conversation[-1]["content"]
        if expected is not None:
            assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
        _, tok = taught
        prompt = tok.apply_chat_template(conversation[:-1], add_generation_prompt=True)
        assert r.usage.prompt_tokens == len(prompt)
        # the reply's tokens and the end-of-turn token that stopped it
        assert r.usage.completion_tokens == len(tok.encode(conversation[-1]["content"])) + 1


def test_streamed_reply_equals_the_whole_one_and_ends_with_done(client, live, taught):
    stream = client.chat.completions.create(
        model="taught",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_reply(taught, QUESTION) == "Mia"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(taught[1].encode("Mia")) + 1  # and <|end|>
    with httpx.stream(
        "POST",
        live.url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "stream": True,
        },
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_reply_gathered_between_writes_still_streams_one_event_per_token(taught, start_server, slow_engine):
    """With serve.stream_interval, tokens decoded between two writes go out in one write, each
    still its own server-sent event: the same text and events, in fewer network chunks; the
    reply's end is written when it comes, not an interval later."""
    model, tok = taught
    # 10 ms a step: the first token is written long before the reply's other 47 are decoded
    server = start_server(model, tok, "taught", engine=slow_engine(0.01))
    try:
        server.served.stream_interval = 5.0  # far longer than the whole reply takes to decode
        body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stream": True}
        chunks, arrived = [], []
        start = time.perf_counter()
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            for chunk in r.iter_raw():
                chunks.append(chunk)
                arrived.append(time.perf_counter() - start)
        events = [e for e in b"".join(chunks).split(b"\n\n") if e.strip()]
        assert events[-1] == b"data: [DONE]"
        pieces = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
        assert len(pieces) == 48  # one event per token (the taught model writes no stray bytes)
        # the first token went at once, the others in one write as soon as the reply ended
        assert len(chunks) <= 3 < len(events)
        assert chunks[0].count(b"data: ") < len(pieces) // 2
        assert arrived[-1] < 3.0
        whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert "".join(pieces) == whole.json()["choices"][0]["text"]
    finally:
        server.close()


def test_the_inbox_wakes_its_waiting_reply_when_the_engine_puts():
    """The engine's thread puts tokens; a reply waiting on an empty inbox is woken at once (not
    at its timeout), one that finds items does not wait, and one that waits in vain times out."""
    from tinyllama.serve.api import _Inbox

    async def scenario():
        inbox = _Inbox(asyncio.get_running_loop())
        assert not await inbox.wait(timeout=0.05)  # nothing came
        threading.Timer(0.05, inbox.put, args=("a",)).start()
        start = time.perf_counter()
        assert await inbox.wait(timeout=10.0)
        woken = time.perf_counter() - start
        inbox.put("b")
        assert await inbox.wait(timeout=10.0)  # already there
        return woken, inbox.drain(), inbox.drain()

    woken, items, again = asyncio.run(scenario())
    assert woken < 5.0  # woken by the put, far before the 10 s timeout
    assert items == ["a", "b"] and again == []


def test_a_gathering_hold_ends_at_a_choices_last_item():
    """`hold` lets items gather for its whole time unless a choice's last item comes: put
    before the hold, or during it; a cancelled hold leaves nothing behind for a later put."""
    from tinyllama.serve.api import _Inbox

    async def timed(inbox, seconds):
        start = time.perf_counter()
        await inbox.hold(seconds)
        return time.perf_counter() - start

    async def scenario():
        inbox = _Inbox(asyncio.get_running_loop())
        threading.Timer(0.02, inbox.put, args=("token",)).start()
        whole = await timed(inbox, 0.3)  # an ordinary item does not cut it short
        inbox.drain()
        inbox.put("end", last=True)
        before = await timed(inbox, 10.0)  # the end came first: no wait at all
        assert inbox.drain() == ["end"]
        threading.Timer(0.05, inbox.put, args=("end",), kwargs={"last": True}).start()
        during = await timed(inbox, 10.0)
        inbox.drain()
        task = asyncio.ensure_future(inbox.hold(10.0))
        await asyncio.sleep(0.02)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        inbox.put("late", last=True)  # wakes no one, raises nothing
        await asyncio.sleep(0.02)
        return whole, before, during, inbox.drain()

    whole, before, during, left = asyncio.run(scenario())
    assert whole >= 0.29 and before < 1.0 and during < 5.0
    assert left == ["late"]


def test_length_limit_n_seed_and_stop(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model="taught", messages=messages, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    kwargs = dict(model="taught", messages=messages, max_tokens=8, temperature=1.0, seed=7, n=3)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert [c.index for c in a.choices] == [0, 1, 2]
    r = client.chat.completions.create(
        model="taught",
        messages=[{"role": "user", "content": "Where does Tom live?"}],
        temperature=0,
        stop=[" small"],
    )
    assert r.choices[0].message.content == "in a" and r.choices[0].finish_reason == "stop"


def test_text_completions(client, taught):
    model, tok = taught
    r = client.completions.create(model="taught", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    import torch

    from tinyllama.generate import generate

    ids = tok.encode("Once upon a time", bos=True)
    out = generate(model, torch.tensor([ids]), 5, temperature=0, eos_token_id=tok.eos_id)[0, len(ids) :]
    assert r.choices[0].text == tok.decode([t for t in out.tolist() if t != tok.eos_id])
    assert r.usage.prompt_tokens == len(ids)


BAD = [
    ("not json", None, 400, "invalid_json"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model", 404, "model_not_found"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", 400, None),
    ({"messages": []}, "messages", 400, None),
    (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
        "max_tokens",
        400,
        "context_length_exceeded",
    ),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n", 400, None),
    ({"messages": [{"role": "user", "content": "hi " * 300}]}, "messages", 400, "context_length_exceeded"),
    ({"messages": "hi"}, "messages", 400, None),
    ({}, "messages", 400, None),
]


@pytest.mark.parametrize("body,param,status,code", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_error_objects_and_the_server_goes_on(
    live, client, body, param, status, code
):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        live.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param and (code is None or error["code"] == code)
    ok = client.chat.completions.create(
        model="taught", messages=[{"role": "user", "content": QUESTION}], temperature=0
    )
    assert ok.choices[0].message.content == "Mia"


def test_the_openai_client_raises_on_bad_requests(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="taught", messages=[{"role": "user", "content": "hi"}], top_p=2)
    assert httpx.get(f"{client.base_url}nowhere").json()["error"]["message"]


def test_a_client_leaving_mid_stream_frees_its_rows(live):
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "temperature": 1.0,
        "max_tokens": 100,
        "stream": True,
        "seed": 1,
    }
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leave with most of the reply still to come
    deadline = time.time() + 10
    while live.served.engine.load()["active_rows"] and time.time() < deadline:
        time.sleep(0.05)
    assert live.served.engine.load() == {**live.served.engine.load(), "active_rows": 0, "waiting_requests": 0}


def test_sixteen_concurrent_clients_all_get_their_replies(live, client):
    questions = [QUESTION, "Where does Tom live?", "Tell me a story."] * 6  # 18 > max_batch 16: some wait

    def ask(i: int):
        stream = i % 2 == 0
        messages = [{"role": "user", "content": questions[i]}]
        if stream:
            chunks = client.chat.completions.create(
                model="taught", messages=messages, temperature=0, max_tokens=12, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client.chat.completions.create(model="taught", messages=messages, temperature=0, max_tokens=12)
        return r.choices[0].message.content

    alone = {q: ask(i) for i, q in enumerate(questions[:3])}
    steps = live.served.engine.steps
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(len(questions))))
    assert replies == [alone[q] for q in questions]  # none lost, each as it is alone
    assert live.served.engine.largest_batch > 1  # they were decoded together
    assert live.served.engine.steps - steps < 12 * len(questions)


def test_a_base_model_serves_completions_and_refuses_chat(tiny_data, tiny_chat_model, start_server):
    import dataclasses

    from tinyllama.tokenizer import ensure_tokenizer

    data, tok_cfg = tiny_data
    plain = ensure_tokenizer(
        dataclasses.replace(tok_cfg, name="no_chat_pieces", user_defined_symbols=[]), data
    )
    server = start_server(tiny_chat_model(plain.vocab_size).eval(), plain, "base")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="base", prompt=["Once upon", "A cat"], max_tokens=4, n=2, seed=3)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        # 4 tokens per choice, fewer for a choice that samples the end of text first
        assert {c.finish_reason for c in r.choices} <= {"stop", "length"}
        assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 0
        if all(c.finish_reason == "length" for c in r.choices):
            assert r.usage.completion_tokens == 16
        with pytest.raises(openai.BadRequestError, match="base model.*completions"):
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
        assert httpx.get(server.url + "/health").json()["chat"] is False
    finally:
        server.close()


def run_serve_script(args, timeout=60):
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_script_prints_its_address_and_refuses_a_port_in_use(chat_run_dir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_serve_script([f"run.dir={chat_run_dir}", "serve.port=0"])
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving chat (chat) from "), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert httpx.get(url + "/health", timeout=10).json()["model"] == "chat"
        port = url.rsplit(":", 1)[1]
        taken = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "serve.py"),
                f"run.dir={chat_run_dir}",
                f"serve.port={port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )
        assert taken.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in taken.stderr
        assert "Traceback" not in taken.stderr and list(cwd.iterdir()) == []
    finally:
        proc.terminate()
        proc.wait(10)
