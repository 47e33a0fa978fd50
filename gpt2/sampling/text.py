"""Text from token ids, one token at a time: `TextStream` holds back incomplete UTF-8 and any tail that could
still become a stop string (litgpt `generate/base.py` handles stops the same way)."""

from __future__ import annotations

import codecs
from typing import Any, Sequence


class TextStream:
    """One sample's text, fed token by token; `push` returns the text that is now safe to show.

    Text is held back while it ends in an incomplete UTF-8 sequence (a BPE token can hold part of a
    character) or in a prefix of a stop string. When a stop string appears, the text before it is final and
    `stopped` becomes True; the stop string itself is not part of the output.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far (stop string cut off once found)
        self.shown = 0  # characters of `text` already returned
        self.stopped = False

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        new = self._utf8.decode(self.tokenizer.decode_bytes([token]))
        if self.stop and new:
            # A stop string can only newly appear in the part that overlaps the new text.
            lookback = max(len(s) for s in self.stop) - 1
            begin = max(0, len(self.text) - lookback)
            self.text += new
            hits = [i for s in self.stop if (i := self.text.find(s, begin)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held())
        self.text += new
        return self._release(len(self.text))

    def finish(self) -> str:
        """Flush everything held back (the sample ended without completing a stop string)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        return piece
