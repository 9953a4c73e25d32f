"""The chat stage (scripts/chat.py, tinyllama-chat): talk to a fine-tuned model, turn by turn.

    run_chat(job)                          one reply to `prompt=`, or an interactive chat on stdin
    ChatSession(model, tokenizer, cfg)     the history, its trimming, and `reply(text, out)`
    greedy_replies(model, tokenizer, ...)  batched greedy replies to many conversations (evaluation)
    sampled_replies(model, tokenizer, ...) the same, sampled (pass@k)

A reply is generated after the conversation's ids in the chat template (tinyllama/chat_template.py)
ending with `<|assistant|>`, and stops at the end-of-turn token `<|end|>` (or `</s>`), which is never
printed. The context holds the system prompt, the history and room for `chat.max_new_tokens`: when
the history outgrows it, its oldest turns are dropped. The model comes from
`tinyllama.checkpoint.load_for_inference` and the tokens from `tinyllama.generate`, as in sampling.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence, TextIO, Union

import torch
from torch import nn

from tinyllama.chat_template import Message, apply_chat_template, end_of_turn_id, require_chat_pieces
from tinyllama.checkpoint import load_for_inference
from tinyllama.config import ChatConfig, is_chat
from tinyllama.errors import ConfigError
from tinyllama.generate import generate, stream_tokens
from tinyllama.sample import TextStream

RESET = "/reset"
"""Typed alone on a line of the interactive chat: forget the history and start over."""


class ChatSession:
    """A conversation with a model: the history of user and assistant messages, kept within the
    model's context, and the replies streamed as they are generated.

    context: positions the prompt and the reply share (default: the model's
    max_position_embeddings); the prompt gets at most context - cfg.max_new_tokens of them.
    weights: the decoding step's matrices (sample.weights: float32, or int8 on the CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cfg: ChatConfig,
        seed: int = 0,
        context: Optional[int] = None,
        weights: str = "float32",
    ) -> None:
        require_chat_pieces(tokenizer)
        self.model, self.tokenizer, self.cfg, self.weights = model, tokenizer, cfg, weights
        self.end_id = end_of_turn_id(tokenizer)
        self.context = context or model.config.max_position_embeddings
        if cfg.max_new_tokens >= self.context:
            raise ConfigError(
                f"chat.max_new_tokens={cfg.max_new_tokens} leaves no room for the conversation in the "
                f"model's context of {self.context} tokens: lower chat.max_new_tokens"
            )
        self.seed = seed
        self.history: List[Message] = []
        self.replies = 0  # replies generated so far: reply i samples with seed + i
        self.dropped = 0  # turns dropped from the history to fit the context, since the last reset

    def reset(self) -> None:
        """Forget the history (the system prompt stays)."""
        self.history, self.dropped = [], 0

    def system(self) -> List[Message]:
        """The system message, or none."""
        return [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []

    def messages(self) -> List[Message]:
        """The system prompt (if any) followed by the history."""
        return self.system() + self.history

    def prompt_ids(self) -> List[int]:
        """The ids the next reply continues: the messages in the template, ending with
        `<|assistant|>`. Drops the oldest turns (a user message and the replies after it) while
        they exceed the room the reply leaves; a last user message too long on its own is
        refused (and removed), the history before it kept."""
        budget = self.context - self.cfg.max_new_tokens
        alone = apply_chat_template(
            self.tokenizer, self.system() + self.history[-1:], add_generation_prompt=True
        )
        if len(alone) > budget:
            self.history.pop()
            raise ConfigError(
                f"the message needs {len(alone)} tokens (with the template and system prompt); with "
                f"chat.max_new_tokens={self.cfg.max_new_tokens} only {budget} of the model's "
                f"{self.context} fit: write a shorter message or lower chat.max_new_tokens"
            )
        ids = apply_chat_template(self.tokenizer, self.messages(), add_generation_prompt=True)
        while len(ids) > budget:
            self.history.pop(0)
            while self.history[0]["role"] != "user":
                self.history.pop(0)
            self.dropped += 1
            ids = apply_chat_template(self.tokenizer, self.messages(), add_generation_prompt=True)
        return ids

    def reply(self, user_text: str, out: Optional[TextIO] = None) -> str:
        """Add `user_text` as a user message, generate the reply (written to `out` as it arrives,
        without the end-of-turn token), add it to the history and return it."""
        self.history.append({"role": "user", "content": user_text})
        ids = self.prompt_ids()
        device = next(self.model.parameters()).device
        cfg = self.cfg
        stream = TextStream(self.tokenizer, [], out)
        for token in stream_tokens(
            self.model,
            torch.tensor([ids], device=device),
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            eos_token_id=self.end_id,
            seed=self.seed + self.replies,
            weights=self.weights,
        ):
            if int(token[0]) in (self.end_id, self.tokenizer.eos_id) or not stream.put(int(token[0])):
                break
        stream.finish()
        self.replies += 1
        self.history.append({"role": "assistant", "content": stream.text})
        return stream.text


def run_chat(
    job, stdin: Optional[TextIO] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> List[str]:
    """The chat stage: load the checkpoint (job.checkpoint_path or run.dir) and reply to `prompt`
    once, or, without it, chat on `stdin` (default sys.stdin) line by line until end of input
    (Ctrl-D), `/reset` starting over. Replies go to `out`, cues and notes to `err`. Returns the
    replies."""
    ckpt, model, tokenizer, _ = load_for_inference(job)
    seed = job.chat.seed if job.chat.seed is not None else job.run.seed
    try:
        session = ChatSession(model, tokenizer, job.chat, seed, weights=job.sample.weights)
    except ConfigError as e:  # no chat pieces, or chat.max_new_tokens beyond the context
        raise ConfigError(f"{ckpt.path} cannot chat: {e}") from None
    if not is_chat(ckpt.job.data):
        err.write(
            f"note: {ckpt.path} was trained on documents (data.source={ckpt.job.data.source}), not "
            "conversations: expect story text, not answers (fine-tune it: experiment=chat_demo)\n"
        )
    if job.prompt is not None:
        reply = session.reply(job.prompt, out)
        out.write("\n")
        out.flush()
        return [reply]
    return chat_loop(session, stdin if stdin is not None else sys.stdin, out, err)


def chat_loop(session: ChatSession, stdin: TextIO, out: TextIO, err: TextIO) -> List[str]:
    """Read user messages from `stdin` (one a line; blank lines skipped) and write each reply on
    its own line of `out`, until end of input. `/reset` clears the history; a message too long
    for the context is refused on `err` and the chat goes on."""
    replies: List[str] = []
    tty = stdin.isatty()
    if tty:
        err.write(f"chat: one message a line; {RESET} starts over, Ctrl-D leaves\n")
    while True:
        if tty:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            return replies
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            session.reset()
            err.write("(history cleared)\n")
            continue
        dropped = session.dropped
        try:
            replies.append(session.reply(text, out))
        except ConfigError as e:
            err.write(f"error: {e}\n")
            continue
        out.write("\n")
        out.flush()
        if session.dropped > dropped:
            err.write(f"(dropped the {session.dropped - dropped} oldest turn(s) to fit the context)\n")


@torch.no_grad()
def greedy_replies(
    model: nn.Module,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    max_new_tokens: Union[int, Sequence[int]],
    batch_size: int = 8,
    weights: str = "float32",
) -> List[str]:
    """The greedy reply to each conversation (its messages in the template, ending with
    `<|assistant|>`), cut at the end-of-turn token or `</s>`, decoded.

    max_new_tokens: one limit for all, or one per conversation (each reply is cut at its own
    limit, so the replies do not depend on how the conversations are batched). Conversations
    run batch_size at a time, left-padded (generate gives each row what it would get alone).
    """
    return sampled_replies(
        model, tokenizer, conversations, max_new_tokens, batch_size, temperature=0.0, weights=weights
    )


@torch.no_grad()
def sampled_replies(
    model: nn.Module,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    max_new_tokens: Union[int, Sequence[int]],
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    seed: int = 0,
    weights: str = "float32",
) -> List[str]:
    """One reply to each conversation as `greedy_replies` gives it, sampled at `temperature`
    (0: greedy) and top_p; batch b samples with seed + b, so the replies are reproducible."""
    end = end_of_turn_id(tokenizer)
    limits = [max_new_tokens] * len(conversations) if isinstance(max_new_tokens, int) else max_new_tokens
    device = next(model.parameters()).device
    replies: List[str] = []
    for b, start in enumerate(range(0, len(conversations), batch_size)):
        prompts = [
            apply_chat_template(tokenizer, c, add_generation_prompt=True)
            for c in conversations[start : start + batch_size]
        ]
        batch_limits = list(limits[start : start + batch_size])
        T = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), T), tokenizer.eos_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, T - len(p) :] = torch.tensor(p)
            attention_mask[i, T - len(p) :] = 1
        ids = generate(
            model,
            input_ids.to(device),
            max(batch_limits),
            temperature=temperature,
            top_p=top_p,
            eos_token_id=end,
            seed=seed + b,
            attention_mask=attention_mask.to(device),
            weights=weights,
        )
        for row, limit in zip(ids[:, T:].tolist(), batch_limits):
            reply = []
            for token in row[:limit]:
                if token in (end, tokenizer.eos_id):
                    break
                reply.append(token)
            replies.append(tokenizer.decode(reply))
    return replies
