"""The text of one generated sequence as its tokens arrive (what `generate_text`, the CLI and the
server stream): cut before the first stop string, and held back while its end could still become a
stop string or ends inside a multi-byte character."""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """    stream = TextStream(tokenizer, ["\\n\\n"], eos_token_id)
    for token in tokens:
        stopped = stream.push(token)          # True once the text holds a stop string
        show(stream.take(final=stopped))      # new text that is safe to show ("" if none)
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), eos_token_id: int | None = None):
        self.tokenizer, self.stop_strings, self.eos_token_id = tokenizer, list(stop_strings), eos_token_id
        self.ids: list[int] = []              # the generated ids, end-of-text left out
        self.shown = 0                        # characters of `text` handed out by take()
        self.stopped = False
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1

    def _cut(self, text: str) -> str:
        ends = [text.find(s) for s in self.stop_strings if s in text]
        return text[:min(ends)] if ends else text

    def push(self, token: int) -> bool:
        """Add one generated token; True when the text now contains a stop string."""
        if token != self.eos_token_id:
            self.ids.append(int(token))
            if self.stop_strings and not self.stopped:
                decoded = self.tokenizer.decode(self.ids)
                self.stopped = self._cut(decoded) != decoded
        return self.stopped

    @property
    def text(self) -> str:
        """All the text so far, cut before a stop string."""
        return self._cut(self.tokenizer.decode(self.ids))

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that can no longer change (all of it when `final`)."""
        text = self.text
        ready = len(text) if final else max(len(text) - self.hold, 0)
        # an unfinished UTF-8 character decodes as U+FFFD and is at most 3 bytes: hold back no more
        # (a model that emits invalid bytes without end must not stall the stream)
        floor = max(self.shown, ready - 3)
        while not final and ready > floor and text[ready - 1] == "\ufffd":
            ready -= 1
        if ready <= self.shown:
            return ""
        piece, self.shown = text[self.shown:ready], ready
        return piece
