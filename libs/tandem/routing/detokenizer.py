"""Incremental detokenization with stop strings.

`IncrementalDetokenizer` turns a growing list of generated token ids into text deltas whose
concatenation equals `tokenizer.decode(all_ids)`. It decodes a short window of recent tokens
(the approach of vLLM / HF TGI): text is released only when the window decodes to something
longer that does not end in U+FFFD, so a multi-byte UTF-8 character split over several
tokens is held back until it is complete.

`StopMatcher` finds stop strings on the text (not on tokens): text that could be the start of
a stop string is held back until it either completes the stop (then the stop and everything
after it are dropped) or cannot anymore.

`TextStream` chains both, as the router uses them per request.
"""
from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        # Text of token_ids[:read_offset] has been released; the window starts at prefix_offset.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return new_text[len(prefix_text):]
        return ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly complete text (may be empty)."""
        self.token_ids.extend(token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """At the end of generation: release held-back text (an incomplete character becomes U+FFFD)."""
        return self._step(final=True)


class StopMatcher:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(stop)
        self._buf = ""
        self.matched: str | None = None

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, delta: str) -> str:
        """Add text; return what can be released. After a match, `matched` is set and the rest is dropped."""
        if self.matched is not None:
            return ""
        if not self.stop:
            return delta
        buf = self._buf + delta
        # The stop that completes first wins (as when text arrives one character at a time);
        # among those ending at the same place, the one starting earliest.
        hit_at, hit, hit_end = -1, None, -1
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (hit is None or (i + len(s), i) < (hit_end, hit_at)):
                hit_at, hit, hit_end = i, s, i + len(s)
        if hit is not None:
            self.matched = hit
            self._buf = ""
            return buf[:hit_at]
        keep = self._held_suffix(buf)
        self._buf = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out if self.matched is None else ""


class TextStream:
    """Token ids in, released text out, with stop strings. `stopped` turns True on a stop match."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = StopMatcher(stop)
        self.text = ""  # everything released so far

    @property
    def stopped(self) -> bool:
        return self.stops.matched is not None

    @property
    def matched_stop(self) -> str | None:
        return self.stops.matched

    def push(self, token_ids: Sequence[int]) -> str:
        out = self.stops.feed(self.detok.add(token_ids))
        self.text += out
        return out

    def finish(self) -> str:
        """Release everything still held (call once, when the worker says the request finished)."""
        if self.stopped:
            return ""
        out = self.stops.feed(self.detok.flush())
        if not self.stopped:
            out += self.stops.flush()
        self.text += out
        return out
