"""The sample stage (scripts/sample.py, tinyllama-sample): prompts in, text streamed out.

    run_sampling(job)      load the checkpoint, stream continuations of each prompt to stdout
    prompts_of(cfg)        the prompts a SampleConfig names (also read by training's samples.txt)
    fit_prompt(...)        a prompt that fits the model's context, or a clear error
    TextStream             generated ids -> text as it arrives, never half a character, cut at stop strings

The model comes from `tinyllama.checkpoint.load_for_inference` and the tokens from
`tinyllama.generate.stream_tokens`; nothing here needs the training package, and training's
end-of-run samples (tinyllama/train/samples.py) import their prompts from here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, TextIO

import torch

from tinyllama.checkpoint import load_for_inference
from tinyllama.config import SampleConfig
from tinyllama.errors import ConfigError
from tinyllama.generate import stream_tokens


def prompts_of(cfg: SampleConfig) -> List[str]:
    """The non-empty lines of cfg.prompt_file, or [cfg.prompt] without one."""
    if cfg.prompt_file:
        lines = Path(cfg.prompt_file).read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()]
    return [cfg.prompt]


def run_sampling(job, prompts: Optional[Iterable[str]] = None, out: TextIO = sys.stdout) -> List[str]:
    """Load the checkpoint (job.checkpoint_path or run.dir) and write job.sample.num_samples
    continuations of each prompt to `out`, token by token when sample.stream.

    Prompts: `prompts` if given, else standard input line by line (sample.interactive), else the
    lines of sample.prompt_file, else `prompt` / sample.prompt. Returns the texts (prompt +
    continuation, cut at EOS).
    """
    s = job.sample
    ckpt, model, tokenizer, device = load_for_inference(job)
    if prompts is None:
        prompts = (
            _stdin_prompts()
            if s.interactive
            else [job.prompt]
            if job.prompt is not None and not s.prompt_file
            else prompts_of(s)
        )
    seed = s.seed if s.seed is not None else job.run.seed
    texts = []
    for prompt in prompts:
        ids = fit_prompt(
            tokenizer.encode(prompt, bos=True),
            s.max_new_tokens,
            ckpt.model_config.max_position_embeddings,
            s.trim_prompt,
        )
        prompt_ids = torch.tensor([ids], device=device)
        for i in range(s.num_samples):
            out.write(f"--- sample {i + 1}/{s.num_samples} (seed {seed + i}) ---\n")
            stream = TextStream(tokenizer, ids, out if s.stream else None)
            for token in stream_tokens(
                model,
                prompt_ids,
                s.max_new_tokens,
                s.temperature,
                s.top_k,
                s.top_p,
                s.repetition_penalty,
                tokenizer.eos_id,
                seed + i,
                weights=s.weights,
            ):
                if not stream.put(int(token[0])):
                    break
            stream.finish()
            texts.append(stream.text)
            out.write((stream.text if not s.stream else "") + "\n")
            out.flush()
    return texts


def fit_prompt(ids: List[int], max_new_tokens: int, context: int, trim: bool) -> List[int]:
    """The prompt's ids if they and max_new_tokens fit the context; else, with trim, <s> plus
    the prompt's last tokens that do; else a ConfigError saying how to fix it."""
    if len(ids) + max_new_tokens <= context:
        return ids
    room = context - max_new_tokens - 1  # prompt tokens that fit after <s>
    if trim and room >= 1:
        return ids[:1] + ids[-room:]
    fix = (
        f"shorten the prompt, lower sample.max_new_tokens, or set sample.trim_prompt=true to keep "
        f"its last {room} tokens"
        if room >= 1
        else "lower sample.max_new_tokens"
    )
    raise ConfigError(
        f"the prompt is {len(ids)} tokens (with <s>); with sample.max_new_tokens="
        f"{max_new_tokens} that needs {len(ids) + max_new_tokens} positions, more than "
        f"the model's context of {context}: {fix}"
    )


class TextStream:
    """Turns generated ids into text as they arrive, handing out only what is new and settled.

    The whole sequence is decoded each time (SentencePiece's spacing depends on the neighbours,
    and a byte-fallback character spans several tokens). Text ending in an incomplete character
    (U+FFFD) is held back until the next token completes it, and so is an end of the generated
    text that begins one of the `stop` strings, until it either completes it (the text then ends
    before it: `stopped`) or is ruled out. Settled text is written to `out` when given, and
    returned by `push`. Without an output or stop strings, `put` leaves the decoding to `finish`
    (once, instead of once per token).
    """

    def __init__(
        self, tokenizer, prompt_ids: List[int], out: Optional[TextIO], stop: Sequence[str] = ()
    ) -> None:
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt_ids), out
        self.stop = [s for s in stop if s]
        self.text = tokenizer.decode(self.ids)
        self.start = len(self.text)  # where the generated text begins: stop strings are found after it
        self.stopped = False
        self._sent = 0
        self._send(len(self.text))

    def put(self, token: int) -> bool:
        """Add one token; False at EOS or once a stop string appeared (the text ends there)."""
        if token == self.tokenizer.eos_id:
            return False
        if self.out is None and not self.stop:
            self.ids.append(token)
            return True
        self.push(token)
        return not self.stopped

    def push(self, token: int) -> str:
        """Add one token (EOS, or any token after a stop string, adds nothing); return the text
        newly settled, which is also written to `out`."""
        if self.stopped or token == self.tokenizer.eos_id:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [at for at in (self.text.find(s, self.start) for s in self.stop) if at >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._send(len(self.text))
        settled = len(self.text.rstrip("\ufffd"))
        return self._send(settled - self._held(self.text[self.start : settled]))

    def finish(self) -> str:
        """Decode what is not yet decoded; write and return what was held back (an incomplete
        character at the very end, the start of a stop string that never completed)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._send(len(self.text))

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _send(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent : upto], upto
        if self.out is not None:
            self.out.write(piece)
            self.out.flush()
        return piece


def _stdin_prompts() -> Iterator[str]:
    """Non-empty lines of standard input until end of input (Ctrl-D), with a "> " cue on a terminal."""
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")
