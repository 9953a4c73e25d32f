"""Continuous batching over one KV cache: the decoding engine behind scripts/serve.py.

Requests that arrive together decode together. The engine runs in its own thread and keeps every
sequence it is decoding (one row per choice of each request) in one KV cache, left-padded as
`generate` pads a batch: each row sees only its own positions (an attention mask over the cache's
columns, per-row position ids), so a row decodes what it would decode alone. Between two steps:

- waiting requests join: their prompts are prefilled together through the model (one left-padded
  batch), then their rows are appended to the cache, the shorter of the two (the batch or the
  newcomers) padded on the left to the other's length;
- finished or cancelled rows leave: their cache rows are dropped at once (a finished row costs
  nothing afterwards), and the columns no remaining row uses any more (padding at the left) are
  cut, so the cache stays as long as the longest sequence in it.

Each step feeds one token per row through `generate.decoding_step` (fast_decode's FastDecoder
on CPU float32 models, else the model's forward) and samples each row with its own settings and
random generator, so a seeded request gets the tokens `generate` gives that seed. The engine knows
tokens only: text, stop strings and the HTTP side live in tinyllama/serve/api.py, which reads the
events a request emits and may cancel it (a stop string, a client that left).

    engine = Engine(model, max_batch=8); engine.start()
    engine.submit(Request(prompt_ids, SamplingParams(max_new_tokens=64), emit))
    # emit(choice, token, finish_reason) is called from the engine's thread for every new token;
    # finish_reason is None while the row goes on, then "stop" or "length" (or "error").
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tinyllama.generate import check_weights, decoding_step, model_logits, next_token
from tinyllama.model import KVCache

logger = logging.getLogger(__name__)

Emit = Callable[[int, Optional[int], Optional[str]], None]
"""emit(choice, token, finish_reason): token None only with finish_reason "error"."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; seed None draws a fresh one; the n
    choices of a request sample with seed, seed + 1, ...; stop_ids end a row (the id is emitted,
    with finish_reason "stop")."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    n: int = 1
    stop_ids: Tuple[int, ...] = ()


class Request:
    """One submission: prompt ids, how to sample, and where its tokens go. `cancel` (from any
    thread) takes it out of the batch before the next step."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Emit) -> None:
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        self.prompt_ids, self.params, self.emit = list(prompt_ids), params, emit
        self.cancelled = False
        self.cancelled_choices: set = set()

    def cancel(self, choice: Optional[int] = None) -> None:
        """Stop decoding all choices (None) or one."""
        if choice is None:
            self.cancelled = True
        else:
            self.cancelled_choices.add(choice)

    def is_cancelled(self, choice: int) -> bool:
        return self.cancelled or choice in self.cancelled_choices


class _Row:
    """One choice being decoded: its next input token and position, and its own generator."""

    BLOCK = 64
    """Uniform numbers a row on the CPU draws from its generator at once: there torch.rand(64)
    gives the numbers 64 calls of torch.rand(1) give (a test holds the engine to `generate`), and
    one call instead of a call per token is a large share of a small model's sampling. Rows on
    other devices hand their generators to `next_token` (whose generators count draws otherwise,
    and whose numbers would cost a wait for the device if read here)."""

    def __init__(self, request: Request, choice: int, device: torch.device) -> None:
        self.request, self.choice = request, choice
        params = request.params
        self.generator = torch.Generator(device=device)  # where the logits it samples from live
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed + choice)
        self.position = len(request.prompt_ids)  # where the next fed token goes, in the row's own count
        self.generated = 0
        self.last_token = -1
        self.done = False
        self._uniforms: List[float] = []  # drawn ahead, next one last

    def uniform(self) -> float:
        """The next uniform number in [0, 1) of this row's generator (a CPU one)."""
        if not self._uniforms:
            self._uniforms = torch.rand(self.BLOCK, generator=self.generator).tolist()
            self._uniforms.reverse()
        return self._uniforms.pop()


class Engine:
    """Decodes submitted requests in batches of at most `max_batch` rows, in a background thread
    (`start`, `stop`). `context`: the most positions a row may use (default: the model's);
    `weights`: the decoding step's matrices (generate's weights: float32, or int8 on the CPU)."""

    def __init__(
        self,
        model: nn.Module,
        max_batch: int = 8,
        fast: bool = True,
        context: Optional[int] = None,
        weights: str = "float32",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        check_weights(model, fast, weights)
        self.model, self.max_batch, self.fast, self.weights = model, max_batch, fast, weights
        self.config = model.config
        self.context = context or self.config.max_position_embeddings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._pending: Deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._rows: List[_Row] = []
        self._cache: Optional[KVCache] = None
        self._mask: Optional[torch.Tensor] = None  # (B, capacity) 1 where a row has a real token
        self._length = 0  # cache columns in use
        self._step: Optional[Callable[..., torch.Tensor]] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # decoding steps run so far
        self.largest_batch = 0  # the most rows one step has decoded

    # -- the public side, called from the server's threads ------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="tinyllama-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the batch before the next step that has room for its n rows."""
        if request.params.n > self.max_batch:
            raise ValueError(
                f"n={request.params.n}: this engine decodes at most {self.max_batch} rows at once"
            )
        with self._wake:
            self._pending.append(request)
            self._wake.notify()

    def load(self) -> dict:
        """Rows being decoded and requests waiting (for /health and tests)."""
        return {"active_rows": len(self._rows), "waiting_requests": len(self._pending), "steps": self.steps}

    # -- the engine's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self._rows:
                    self._wake.wait()
                if self._stopping:
                    return
                joining = self._take_joining()
            try:
                with torch.inference_mode():
                    if joining:
                        self._join(joining)
                    self._leave()
                    if self._rows:
                        self._decode_step()
                        self._leave()
            except Exception:  # a fault must not strand the clients: each request hears of it
                logger.exception("decoding failed; the requests in the batch end with an error")
                for request in {row.request for row in self._rows} | set(joining):
                    for choice in range(request.params.n):
                        request.emit(choice, None, "error")
                self._rows, self._cache, self._mask, self._length = [], None, None, 0

    def _take_joining(self) -> List[Request]:
        """The waiting requests (oldest first) whose rows fit beside the batch; cancelled ones
        are dropped unseen."""
        joining: List[Request] = []
        room = self.max_batch - len(self._rows)
        while self._pending and (self._pending[0].cancelled or self._pending[0].params.n <= room):
            request = self._pending.popleft()
            if not request.cancelled:
                joining.append(request)
                room -= request.params.n
        return joining

    def _join(self, requests: List[Request]) -> None:
        """Prefill the newcomers' prompts in one left-padded batch, sample each row's first token,
        and append their rows to the batch's cache."""
        lengths = [len(r.prompt_ids) for r in requests]
        P = max(lengths)
        input_ids = torch.zeros(len(requests), P, dtype=torch.long)
        mask = torch.zeros(len(requests), P, dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, P - lengths[i] :] = torch.tensor(r.prompt_ids)
            mask[i, P - lengths[i] :] = 1
        padded = min(lengths) < P
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if padded else None
        cache = KVCache(
            self.config, batch_size=len(requests), max_length=P, device=self.device, dtype=self.dtype
        )
        logits = model_logits(
            self.model,
            input_ids.to(self.device),
            mask.to(self.device) if padded else None,
            None if positions is None else positions.to(self.device),
            cache,
        )
        rows = [_Row(r, choice, self.device) for r in requests for choice in range(r.params.n)]
        index = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.params.n)])
        if len(index) > len(requests):  # n > 1: a prompt's cache is copied to each of its rows
            logits, mask = logits[index], mask[index]
            cache.select_rows(index.to(self.device))
        self._append(cache, mask.to(self.device), rows)
        self._sample(rows, logits)

    def _decode_step(self) -> None:
        """One token for every row: feed each row's last token at its own position."""
        B, L = len(self._rows), self._length
        self._reserve(L + 1)
        self._mask[:, L] = 1
        tokens = torch.tensor([[row.last_token] for row in self._rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self._rows], device=self.device)
        if self._step is None:
            self._step = decoding_step(self.model, self.fast, self.weights)
        logits = self._step(tokens, self._mask[:, : L + 1], positions, self._cache)
        self._length = L + 1
        for row in self._rows:
            row.position += 1
        self.steps += 1
        self.largest_batch = max(self.largest_batch, B)
        self._sample(self._rows, logits)

    def _sample(self, rows: List[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits (len(rows), V), as `generate` does with that
        row's settings and generator, emit it, and mark the rows that end. Rows that share their
        settings are sampled in one `next_token` call (the server's clients mostly do)."""
        groups: Dict[Tuple, List[int]] = collections.defaultdict(list)
        for i, row in enumerate(rows):
            p = row.request.params
            groups[(p.temperature, p.top_k, p.top_p)].append(i)
        tokens = [0] * len(rows)
        for (temperature, top_k, top_p), members in groups.items():
            group_logits = logits[torch.tensor(members, device=logits.device)]
            generators = uniforms = None
            if temperature > 0 and logits.device.type == "cpu":
                uniforms = [rows[i].uniform() for i in members]
            elif temperature > 0:
                generators = [rows[i].generator for i in members]
            chosen = next_token(group_logits, temperature, top_k, top_p, 1.0, None, generators, uniforms)
            for i, token in zip(members, chosen.tolist()):
                tokens[i] = token
        for row, token in zip(rows, tokens):
            p = row.request.params
            row.last_token, row.generated = token, row.generated + 1
            finish = None
            if token in p.stop_ids:
                finish = "stop"
            elif row.generated >= p.max_new_tokens or row.position >= self.context:
                finish = "length"
            row.done = finish is not None
            if not row.request.is_cancelled(row.choice):
                row.request.emit(row.choice, token, finish)

    # -- the cache: rows join on the right, leave anywhere, padding columns cut on the left ------

    def _append(self, cache: KVCache, mask: torch.Tensor, rows: List[_Row]) -> None:
        """Add rows whose prompts fill `cache` (b, H_kv, P, D) and `mask` (b, P) to the batch."""
        P = mask.shape[1]
        if not self._rows:
            self._cache, self._mask, self._length, self._rows = cache, mask, P, rows
            return
        B, L = len(self._rows), self._length
        new_length = max(L, P)
        merged = KVCache(self.config, B + len(rows), new_length, device=self.device, dtype=self.dtype)
        for buffers, old, new in (
            (merged.keys, self._cache.keys, cache.keys),
            (merged.values, self._cache.values, cache.values),
        ):
            for layer in range(len(buffers)):
                buffers[layer][:B, :, new_length - L :] = old[layer][:, :, :L]
                buffers[layer][B:, :, new_length - P :] = new[layer][:, :, :P]
        merged.lengths = [new_length] * len(merged.lengths)
        merged_mask = torch.zeros(B + len(rows), new_length, dtype=torch.long, device=self.device)
        merged_mask[:B, new_length - L :] = self._mask[:, :L]
        merged_mask[B:, new_length - P :] = mask
        self._cache, self._mask, self._length = merged, merged_mask, new_length
        self._rows = self._rows + rows

    def _leave(self) -> None:
        """Drop finished and cancelled rows, then the columns at the left that only padding fills."""
        keep = [
            i for i, row in enumerate(self._rows) if not row.done and not row.request.is_cancelled(row.choice)
        ]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._length = [], None, None, 0
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache.select_rows(index)
        self._mask = self._mask[index]
        used = self._mask[:, : self._length].any(dim=0)
        start = int(used.long().argmax())  # the first column some row still reads
        if start > 0:
            L = self._length - start
            self._cache.keep_columns(start, self._length)
            self._mask = self._mask[:, start : self._length].clone()
            self._length = L

    def _reserve(self, columns: int) -> None:
        """Make the mask hold `columns` columns (the cache grows by itself when written)."""
        if self._mask.shape[1] < columns:
            grown = torch.zeros(self._mask.shape[0], max(columns, 2 * self._mask.shape[1]), dtype=torch.long)
            grown[:, : self._mask.shape[1]] = self._mask
            self._mask = grown.to(self.device)
