"""The router's text of one sample: incremental detokenization, holding back what may still
become a stop string.

The worker's engine decides where a stop string ends a request (``tandem.sampling.text``:
one incremental check) and says so in its last chunk (``stop_text_pos``, ``matched_stop``).
The router does not match stop strings again: it releases text as tokens arrive, except a
suffix that could be the start of a stop string (it would have to be taken back), and at
the end cuts the text where the worker said the stop string begins.
"""
from __future__ import annotations

from collections.abc import Sequence

from tandem.sampling import IncrementalDetokenizer


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Token ids in, released text out. ``text`` is everything released so far."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = list(stop)
        self.text = ""
        self._held = ""  # decoded, not released: it could still be the start of a stop string

    def push(self, token_ids: Sequence[int]) -> str:
        buf = self._held + self.detok.add(token_ids)
        keep = held_suffix(buf, self.stop) if self.stop else 0
        out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def finish(self, token_ids: Sequence[int] = (), stop_text_pos: int | None = None) -> str:
        """The rest of the text, with the last chunk's ``token_ids``, once the worker said the
        request finished (call once). ``stop_text_pos``: a stop string begins there (in the
        whole text); nothing from it on is released."""
        buf = self._held + self.detok.add(token_ids)
        buf += self.detok.flush()
        self._held = ""
        if stop_text_pos is not None:
            buf = buf[:max(0, stop_text_pos - len(self.text))]
        self.text += buf
        return buf
