"""The HTTP side of scripts/serve.py: OpenAI's API shapes on FastAPI, over the batching engine.

    GET  /v1/models              the one model this server holds
    POST /v1/chat/completions    messages through the chat template; `stream: true` as SSE
    POST /v1/completions         a text prompt continued (base models too)
    GET  /health                 liveness, and the engine's load
    GET  /                       the chat page (tinyllama/serve/page.html)

Every request becomes an engine `Request` (one row per choice); its tokens come back from the
engine's thread through an `_Inbox` and are turned into text by `sample.TextStream` (the chat
stage's too); a streamed reply writes what `serve.stream_interval` gathered in one write, one
server-sent event per token. Bad requests get OpenAI's error object,
`{"error": {"message", "type", "param", "code"}}`, with status 400 (404 for an unknown model or
route), and the server goes on serving. A streamed request whose client goes away is cancelled,
which frees its rows before the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from tinyllama.chat_template import ROLES, apply_chat_template, end_of_turn_id, missing_pieces
from tinyllama.config import ServeConfig
from tinyllama.sample import TextStream
from tinyllama.serve.engine import Engine, SamplingParams
from tinyllama.serve.engine import Request as EngineRequest

PAGE = Path(__file__).with_name("page.html")
MAX_STOP = 4  # stop strings a request may give, as OpenAI allows


class APIError(Exception):
    """A request the server refuses, as OpenAI's error object."""

    def __init__(
        self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Sampling(BaseModel):
    """The fields both endpoints share (unknown fields, such as presence_penalty, are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None


class ChatRequest(_Sampling):
    messages: List[Dict[str, Any]]
    max_completion_tokens: Optional[int] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]


@dataclass
class ServedModel:
    """What the app serves: the engine, its tokenizer, the id requests name, and defaults.
    `conversations` says whether the model was fine-tuned on conversations (the chat page talks
    to it) or trained on documents (the page has it continue a text, even when its tokenizer has
    the chat pieces and the chat endpoint accepts it)."""

    engine: Engine
    tokenizer: Any
    model_id: str
    created: int
    default_max_tokens: int = 256
    conversations: bool = True
    stream_interval: float = ServeConfig.stream_interval

    @property
    def context(self) -> int:
        return self.engine.context

    @property
    def chat(self) -> bool:
        return not missing_pieces(self.tokenizer)


def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI app over `served` (its engine must be started by the caller)."""
    app = FastAPI(title="tinyllama", docs_url=None, redoc_url=None)
    page_html = PAGE.read_text(encoding="utf-8")  # read once: the page is the same for every request

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if first.get("type") == "json_invalid":
            return APIError(f"the body is not valid JSON: {first.get('msg')}", code="invalid_json").response()
        return APIError(f"{where or 'body'}: {first.get('msg')}", param=where or None).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        return APIError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code).response()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {
            "status": "ok",
            "model": served.model_id,
            "chat": served.chat,
            "trained_on": "conversations" if served.chat and served.conversations else "documents",
            "context": served.context,
            **served.engine.load(),
        }

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> Dict[str, Any]:
        _check_model(served, model_id)
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _check_model(served, body.model)
        if not served.chat:
            raise APIError(
                f"{served.model_id} is a base model: its tokenizer has no chat pieces "
                f"{missing_pieces(served.tokenizer)}, so it cannot take messages. Use /v1/completions, "
                "or serve a run fine-tuned for chat (experiment=chat_demo)",
                param="messages",
                code="model_not_chat",
            )
        prompt = apply_chat_template(served.tokenizer, _messages(body.messages), add_generation_prompt=True)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        end_ids = (end_of_turn_id(served.tokenizer), served.tokenizer.eos_id)
        return await _respond(served, body, [prompt], limit, end_ids, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError("prompt is an empty list: give a string or a list of strings", param="prompt")
        prompts = [served.tokenizer.encode(text, bos=True) for text in texts]
        end_ids = (served.tokenizer.eos_id,)
        return await _respond(served, body, prompts, body.max_tokens, end_ids, request, chat=False)

    return app


def _model_card(served: ServedModel) -> Dict[str, Any]:
    return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "tinyllama"}


def _check_model(served: ServedModel, model_id: Optional[str]) -> None:
    if model_id is not None and model_id != served.model_id:
        raise APIError(
            f"the model {model_id!r} does not exist: this server holds {served.model_id!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
            status=404,
        )


def _messages(messages: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """OpenAI's messages -> the template's {role, content} strings (text parts joined)."""
    if not messages:
        raise APIError("messages is empty: give at least one message", param="messages")
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise APIError(
                f"messages[{i}].role={role!r}: this model knows the roles {', '.join(ROLES)}",
                param=f"messages[{i}].role",
            )
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(
                    f"messages[{i}].content: only text parts are understood", param=f"messages[{i}].content"
                )
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _params(served: ServedModel, body: _Sampling, prompts: List[List[int]], limit: Optional[int], end_ids):
    """Check the sampling fields against the model and turn them into SamplingParams and stops."""
    if body.temperature < 0:
        raise APIError(f"temperature={body.temperature}: must be >= 0 (0 is greedy)", param="temperature")
    if not 0 < body.top_p <= 1:
        raise APIError(f"top_p={body.top_p}: must be in (0, 1]", param="top_p")
    if not 1 <= body.n <= served.engine.max_batch:
        raise APIError(f"n={body.n}: must be in [1, {served.engine.max_batch}] on this server", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise APIError(f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    longest = max(len(p) for p in prompts)
    room = served.context - longest
    if room < 1:
        raise APIError(
            f"the prompt is {longest} tokens, and this model's context is {served.context}: shorten it",
            param="messages",
            code="context_length_exceeded",
        )
    param = (
        "max_completion_tokens"
        if isinstance(body, ChatRequest) and body.max_completion_tokens
        else "max_tokens"
    )
    if limit is not None and limit < 1:
        raise APIError(f"{param}={limit}: must be >= 1", param=param)
    if limit is not None and limit > room:
        raise APIError(
            f"{param}={limit} with a prompt of {longest} tokens needs {longest + limit} positions; this "
            f"model's context is {served.context}: ask for at most {room}",
            param=param,
            code="context_length_exceeded",
        )
    params = SamplingParams(
        max_new_tokens=limit if limit is not None else min(served.default_max_tokens, room),
        temperature=body.temperature,
        top_p=None if body.top_p == 1 else body.top_p,
        seed=body.seed,
        n=body.n,
        stop_ids=tuple(end_ids),
    )
    return params, stop


async def _respond(
    served: ServedModel, body: _Sampling, prompts, limit, end_ids, request: Request, chat: bool
):
    params, stop = _params(served, body, prompts, limit, end_ids)
    run = _Run(served, prompts, params, stop, end_ids)
    meta = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": served.model_id,
    }
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(run, meta, chat, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    texts = ["" for _ in range(run.choices)]
    async for events in run.events(request):
        for choice, delta, _ in events:
            texts[choice] += delta
    if "error" in run.finish:
        raise APIError("decoding failed on the server; see its log", status=500)
    choices = []
    for i, text in enumerate(texts):
        if chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": run.finish[i],
                }
            )
        else:
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": run.finish[i]})
    kind = "chat.completion" if chat else "text_completion"
    return {**meta, "object": kind, "choices": choices, "usage": run.usage()}


async def _sse(run: "_Run", meta: Dict[str, Any], chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shape, ending with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: int, text: Optional[str], finish: Optional[str], first: bool = False) -> str:
        if chat:
            delta: Dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            entry = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            entry = {"index": choice, "text": text or "", "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({**meta, "object": kind, "choices": [entry]}) + "\n\n"

    if chat:
        yield "".join(chunk(i, None, None, first=True) for i in range(run.choices))
    failed = False
    async for events in run.events(None, every=run.served.stream_interval):
        # one event per token, the events that arrived together sent in one write
        out = []
        for choice, delta, finish in events:
            if finish == "error":
                error = {"message": "decoding failed on the server; see its log", "type": "server_error"}
                out.append("data: " + json.dumps({"error": error}) + "\n\n")
                failed = True
                break
            if delta or finish:
                out.append(chunk(choice, delta, finish))
        if out:
            yield "".join(out)
        if failed:
            break
    if include_usage:
        yield "data: " + json.dumps({**meta, "object": kind, "choices": [], "usage": run.usage()}) + "\n\n"
    yield "data: [DONE]\n\n"


class _Inbox:
    """What the engine's thread hands one request's coroutine: items put from that thread and
    drained on the event loop. The loop is woken (call_soon_threadsafe, a system call) only when
    the coroutine waits on an empty inbox, or when a choice's last item ends a `hold`, not for
    every token: a reply gathering tokens for serve.stream_interval costs no wake-up while it
    gathers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: List[Any] = []
        self._lock = threading.Lock()
        self._waiter: Optional[asyncio.Future] = None
        self._holder: Optional[asyncio.Future] = None  # a `hold` that a last item cuts short
        self._last = False  # a last item waits to be drained

    def put(self, item: Any, last: bool = False) -> None:
        """Add an item (from any thread), waking the coroutine if it waits; a `last` item (a
        choice's end) also ends a `hold`."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
            if last:
                self._last = True
                waiter, self._holder = waiter or self._holder, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def hold(self, seconds: float) -> None:
        """Let items gather for `seconds`, or until a last item arrives: the end of a reply is
        written at once, not an interval later."""
        with self._lock:
            if self._last:
                return
            self._holder = holder = self._loop.create_future()
        try:
            await asyncio.wait_for(holder, seconds)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._holder = None

    async def wait(self, timeout: float) -> bool:
        """True once there is something to drain; False after `timeout` seconds of nothing."""
        with self._lock:
            if self._items:
                return True
            self._waiter = waiter = self._loop.create_future()
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:  # also when cancelled (a client gone): put() then wakes no one
            with self._lock:
                self._waiter = None
        with self._lock:
            return bool(self._items)

    def drain(self) -> List[Any]:
        """Everything put since the last drain, oldest first."""
        with self._lock:
            items, self._items, self._last = self._items, [], False
        return items


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():  # a wait that timed out has cancelled its future
        waiter.set_result(None)


class _Run:
    """One HTTP request in the engine: a Request per prompt, n rows each, and the text of each
    choice (choice index = prompt index x n + sample index, as OpenAI numbers them)."""

    def __init__(
        self, served: ServedModel, prompts, params: SamplingParams, stop: List[str], end_ids
    ) -> None:
        self.served, self.prompts, self.params = served, prompts, params
        self.choices = len(prompts) * params.n
        self.end_ids = set(end_ids)
        self.texts = [TextStream(served.tokenizer, [], None, stop) for _ in range(self.choices)]
        self.tokens = [0] * self.choices
        self.finish: List[Optional[str]] = [None] * self.choices

    async def events(
        self, http: Optional[Request], every: float = 0.0
    ) -> AsyncIterator[List[Tuple[int, str, Optional[str]]]]:
        """Lists of (choice, new text, finish_reason or None) as the engine decodes: all that
        arrived since the consumer last asked, and no sooner than `every` seconds after the
        previous list (the first comes as soon as there is something, and so does a choice's
        end at a stop token or the length limit; an end at a stop string is found here, when
        the gathered tokens are read, and its row decodes until then), so that a streamed reply
        writes what that time gathered at once. Cancels the rows when the consumer stops early
        (a client gone mid-stream) or `http` reports a disconnect."""
        loop = asyncio.get_running_loop()
        inbox = _Inbox(loop)
        requests = []
        for p, prompt in enumerate(self.prompts):
            offset = p * self.params.n

            def emit(choice, token, finish, offset=offset):
                inbox.put((offset + choice, token, finish), last=finish is not None)

            requests.append(EngineRequest(prompt, self.params, emit))
        for r in requests:
            self.served.engine.submit(r)
        open_choices = self.choices
        last = -math.inf  # the first tokens go at once
        try:
            while open_choices:
                wait = last + every - loop.time()
                if wait > 0:  # the previous batch left less than `every` ago: gather what comes
                    await inbox.hold(wait)
                if not await inbox.wait(timeout=1.0):
                    if http is not None and await http.is_disconnected():
                        return
                    continue
                events = []
                arrived = inbox.drain()
                for choice, token, finish in arrived:
                    if self.finish[choice] is not None:
                        continue  # a choice cut at a stop string: the engine's last tokens are dropped
                    text = self.texts[choice]
                    delta = ""
                    if token is not None:
                        self.tokens[choice] += 1
                        if token not in self.end_ids:  # the end-of-turn piece is not part of the reply
                            delta = text.push(token)
                    if text.stopped:
                        finish = "stop"
                        requests[choice // self.params.n].cancel(choice % self.params.n)
                    if finish is not None:
                        delta += text.finish()
                        self.finish[choice] = finish
                        open_choices -= 1
                    events.append((choice, delta, finish))
                if events:
                    last = loop.time()
                    yield events
        finally:
            if open_choices:
                for r in requests:
                    r.cancel()

    def usage(self) -> Dict[str, int]:
        prompt = sum(len(p) for p in self.prompts) * 1
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
