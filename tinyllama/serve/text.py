"""From a choice's tokens to the text a client sees: streamed in pieces, cut at stop strings.

A reply's text is its tokens decoded together (SentencePiece's spacing depends on the
neighbours, and a byte-fallback character spans several tokens), so each new token re-decodes
the choice and hands out only what is new and settled: never half a character (text ending in
U+FFFD waits for the next token), and never the start of what may turn out to be a stop string
(held back until it is either completed, and cut, or ruled out).
"""

from __future__ import annotations

from typing import Iterable, List, Sequence


class ChoiceText:
    """The text of one choice as its tokens arrive. `push(token)` returns the new text that is
    safe to send; `stopped` turns True when a stop string appears (the text ends before it);
    `flush()` returns what was held back, once the choice has ended."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), end_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.end_ids = set(end_ids)
        self.ids: List[int] = []
        self.text = ""  # the whole text so far (up to a stop string, once one appeared)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token (an end id adds no text); return the text newly settled."""
        if self.stopped or token in self.end_ids:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [at for at in (self.text.find(s) for s in self.stop) if at >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._send(len(self.text))
        settled = len(self.text.rstrip("\ufffd"))
        return self._send(settled - self._held(self.text[:settled]))

    def flush(self) -> str:
        """Everything not yet sent (at the end of the choice nothing is held back any more)."""
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
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece
