"""The serve stage (scripts/serve.py, tinyllama-serve): a run's checkpoint behind OpenAI's API.

    run_serve(job)              load the checkpoint, bind serve.host:serve.port, serve until Ctrl-C
    open_socket(host, port)     the listening socket, or one clear error when the port is taken

The model comes from `tinyllama.checkpoint.load_for_inference`, as in the chat and sample stages
(a LoRA run arrives merged), and decodes in `Engine`'s thread; uvicorn runs the app of
tinyllama/serve/api.py on the socket opened here, so a port already in use is refused before the
model loads and port 0 gets a free one.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

import torch
import uvicorn

from tinyllama.checkpoint import load_for_inference
from tinyllama.config import is_chat, run_dir_of
from tinyllama.errors import ConfigError
from tinyllama.serve.api import ServedModel, create_app
from tinyllama.serve.engine import Engine


def open_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; port 0 takes a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another server?): stop it, or pick another "
                f"port with serve.port=<n> (serve.port=0 takes a free one)"
            ) from None
        raise ConfigError(
            f"cannot listen on {host}:{port}: {e.strerror}: check serve.host and serve.port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_serve(job, out: TextIO = sys.stdout, on_ready: Optional[Callable[[str], None]] = None) -> None:
    """The serve stage: bind the socket, load the checkpoint (job.checkpoint_path or run.dir),
    print the address, and serve until interrupted. on_ready(url) is called once it listens."""
    s = job.serve
    sock = open_socket(s.host, s.port)
    try:
        ckpt, model, tokenizer, device = load_for_inference(job)
        if torch.device(device).type == "cpu":
            torch.set_num_threads(s.threads or max(1, _usable_cores() - 1))
        model_id = s.model_id or _run_name(job, ckpt.path)
        engine = Engine(model, max_batch=s.max_batch, weights=job.sample.weights).start()
        served = ServedModel(
            engine,
            tokenizer,
            model_id,
            int(Path(ckpt.path).stat().st_mtime),
            s.max_new_tokens,
            conversations=is_chat(ckpt.job.data),
            stream_interval=s.stream_interval,
        )
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning", access_log=False))
        if not served.chat:
            kind = "base model: /v1/completions only"
        elif not served.conversations:
            kind = f"trained on documents (data.source={ckpt.job.data.source}): the page continues text"
        else:
            kind = "chat"
        out.write(
            f"serving {model_id} ({kind}) from {ckpt.path} at {url}  (chat page: {url}/, API: {url}/v1)\n"
        )
        out.flush()
        if on_ready is not None:
            on_ready(url)
        server.run(sockets=[sock])
        engine.stop()
    finally:
        sock.close()


def _run_name(job, checkpoint: Path) -> str:
    """The model's id: the run folder's name (runs/chat_demo -> chat_demo)."""
    if job.checkpoint_path:
        path = Path(checkpoint).resolve()
        return next((p.parent.name for p in [path, *path.parents] if p.name == "checkpoints"), path.name)
    return run_dir_of(job).resolve().name


def _usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
