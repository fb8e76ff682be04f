"""Generated ids -> text deltas, with stop strings (the host side of stopping).

`TextStream.feed(new_ids)` returns the text that is safe to send: the whole generation is
decoded again each time (SentencePiece puts word-boundary spaces right only in context), and
text is held back while it ends in an incomplete character (U+FFFD) or could still become a
stop string. When a stop string appears the text is cut before it and `stopped` is set; the
caller then cancels the request (its slot frees at the next scheduler step).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class TextStream:
    def __init__(self, tokenizer, stop_ids: Iterable[int], stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop_ids = {int(i) for i in stop_ids}
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""
        self.stopped = False  # a stop string was found

    def feed(self, new_ids: Iterable[int]) -> str:
        """Adds ids; returns the new text that can be sent now ('' when none)."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in new_ids if int(i) not in self.stop_ids)
        self.text = self.tok.decode(self.ids)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._take(len(self.text))
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":  # a partial UTF-8 character
            end -= 1
        return self._take(end - self._held_back(end))

    def flush(self) -> str:
        """The rest of the text once the generation has ended."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out

    def _first_stop(self) -> int | None:
        # Only text not yet sent can hold a new stop string (plus its overlap with the sent part).
        lo = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, end - self.sent), best, -1):
                if self.text[end - n : end] == s[:n]:
                    best = n
                    break
        return best
