"""A real server on a free loopback port, over the tiny taught chat model (tests/conftest.py)."""

from __future__ import annotations

import functools
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
import uvicorn  # noqa: E402

from tinyllama.serve.api import ServedModel, create_app  # noqa: E402
from tinyllama.serve.engine import Engine  # noqa: E402
from tinyllama.serve.server import open_socket  # noqa: E402


class LiveServer:
    """uvicorn serving `served` in a thread on 127.0.0.1:<free port>; `url` is its address."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.sock = open_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(served), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.served.engine.stop()
        self.sock.close()


class SlowEngine(Engine):
    """An engine whose decoding steps each take `step_seconds` longer: a reply long enough in
    time that a test can act in the middle of it, whatever the machine's speed."""

    def __init__(self, *args, step_seconds: float = 0.05, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_seconds = step_seconds

    def _decode_step(self) -> None:
        time.sleep(self.step_seconds)
        super()._decode_step()


@pytest.fixture
def slow_engine():
    """slow_engine(seconds) -> an `engine` for start_server whose steps take that much longer."""
    return lambda seconds: functools.partial(SlowEngine, step_seconds=seconds)


@pytest.fixture
def start_server():
    """start_server(model, tokenizer, model_id, engine=Engine, conversations=True) -> a started
    LiveServer (the test closes it); `conversations=False` serves it as a run trained on documents."""

    def start(model, tokenizer, model_id: str, engine=Engine, conversations: bool = True) -> LiveServer:
        served = ServedModel(
            engine(model, max_batch=8).start(), tokenizer, model_id, 0, conversations=conversations
        )
        return LiveServer(served)

    return start


@pytest.fixture
def chat_run_dir(taught, save_chat_run, tmp_path):
    """A run folder tmp_path/chat holding the taught model as a chat run."""
    from tinyllama.config import DataConfig

    model, tok = taught
    save_chat_run(tmp_path / "chat", model, tok, DataConfig(name="synthetic_chat", source="synthetic_chat"))
    return tmp_path / "chat"


@pytest.fixture(scope="module")
def live(taught):
    """A LiveServer over the taught chat model, max_batch 16, id "taught"."""
    model, tok = taught
    served = ServedModel(Engine(model, max_batch=16).start(), tok, "taught", 0, default_max_tokens=16)
    server = LiveServer(served)
    yield server
    server.close()
