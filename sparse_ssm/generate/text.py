"""The text of one generated sequence as its tokens arrive (what `generate_text`, the CLI and the
server stream): cut before the first stop string, and held back while its end could still become a
stop string or ends inside a multi-byte character.

The text is decoded incrementally (the cost of a token does not grow with the sequence): the ids
already settled are never decoded again; each token decodes a short window of ids that starts a few
tokens back (so a decoder that looks at its neighbours, as byte-level BPE's or sentencepiece's
byte fallback and leading-space rules do, sees the same context) and keeps the window's text beyond
what its first part decodes to.  The window moves on once its text no longer ends inside a character.
"""

from __future__ import annotations

from typing import Sequence

MAX_CHAR_TOKENS = 3    # ids an unfinished UTF-8 character can span (at most 3 of its 4 bytes)


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
        # the window: ids[start:settled] decode to `base`; `settled_text` is the text of ids[:settled]
        self.start = self.settled = 0
        self.base = self.settled_text = self.full = ""

    def _cut(self, text: str) -> str:
        ends = [text.find(s) for s in self.stop_strings if s in text]
        return text[:min(ends)] if ends else text

    def _decode(self) -> str:
        """The text of all ids, from the settled text and the window's; the window moves on when its
        text ends on a whole character, or past all but the last MAX_CHAR_TOKENS ids (which may still
        end an unfinished character) when it holds more (invalid bytes must not stall the stream)."""
        window = self.tokenizer.decode(self.ids[self.start:])
        whole = not window.endswith("\ufffd")
        consistent = window.startswith(self.base)
        # inconsistent: a byte-fallback decoder turns a whole run of byte tokens into U+FFFD while its
        # last character is unfinished (the settled text keeps the run's finished characters)
        tail = window[len(self.base):] if consistent else self.tokenizer.decode(self.ids[self.settled:])
        text = self.settled_text + tail
        end = len(self.ids) if whole and consistent else len(self.ids) - MAX_CHAR_TOKENS
        if end > self.settled:
            part = window if end == len(self.ids) else self.tokenizer.decode(self.ids[self.start:end])
            if consistent and part.startswith(self.base):
                self.settled_text += part[len(self.base):]
            else:       # a decoder that rewrote earlier text (byte fallback over an invalid run): anew
                self.settled_text = self.tokenizer.decode(self.ids[:end])
            self.start, self.settled = self.settled, end
            self.base = self.tokenizer.decode(self.ids[self.start:end])
        return text

    def push(self, token: int) -> bool:
        """Add one generated token; True when the text now contains a stop string."""
        if token != self.eos_token_id:
            self.ids.append(int(token))
            self.full = self._decode()
            if self.stop_strings and not self.stopped:
                self.stopped = self._cut(self.full) != self.full
        return self.stopped

    @property
    def text(self) -> str:
        """All the text so far, cut before a stop string."""
        return self._cut(self.full)

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that can no longer change (all of it when `final`): the settled
        text, less the end that could still become a stop string."""
        text = self.text
        ready = len(text) if final else min(len(self._cut(self.settled_text)), max(len(text) - self.hold, 0))
        if ready <= self.shown:
            return ""
        piece, self.shown = text[self.shown:ready], ready
        return piece
