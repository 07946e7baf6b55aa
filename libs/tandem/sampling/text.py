"""Output text, shared by the engine and the router: incremental detokenization and the
incremental stop-string check.

`IncrementalDetokenizer` turns a growing list of generated token ids into text deltas whose
concatenation equals `tokenizer.decode(all_ids)`. It decodes a short window of recent tokens
(the approach of vLLM / HF TGI): text is released only when the window decodes to something
longer that does not end in U+FFFD, so a multi-byte UTF-8 character split over several
tokens is held back until it is complete. Any tokenizer with ``decode(ids,
skip_special_tokens=...)`` works (``tokenizers.Tokenizer`` in the engine, a transformers
tokenizer in the router).

`StopStrings` is the engine's stop-string check: each new piece of text is searched together
with the last ``len(longest stop) - 1`` characters before it, never the whole output again.
Its ``pos`` (where the stop string begins, in characters of the output text) travels to the
router as ``stop_text_pos``; the router cuts its own text there instead of matching again.
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


class StopStrings:
    """Incremental stop-string search over a text that arrives in pieces.

    ``feed(piece)`` returns True once a stop string is complete: ``matched`` is it and ``pos``
    the index in the whole text where it begins. The stop that completes first wins (as when
    the text arrives one character at a time); among those ending at the same place, the one
    starting earliest. ``armed=False`` (min_tokens not reached) lets text pass unchecked: a
    stop string that ended there never matches later.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = list(stop)
        self._keep = max((len(s) for s in self.stop), default=1) - 1  # characters a later stop may start in
        self._tail = ""  # the text's last _keep characters
        self._tail_at = 0  # index of _tail[0] in the whole text
        self.matched: str | None = None
        self.pos: int | None = None

    def feed(self, piece: str, armed: bool = True) -> bool:
        if self.matched is not None:
            return True
        buf = self._tail + piece
        if armed and piece:
            best = None
            for s in self.stop:
                i = buf.find(s, max(0, len(self._tail) - len(s) + 1))  # only stops that end in the new piece
                if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
                    best = (i, s)
            if best is not None:
                self.matched, self.pos = best[1], self._tail_at + best[0]
                return True
        cut = max(0, len(buf) - self._keep)
        self._tail, self._tail_at = buf[cut:], self._tail_at + cut
        return False
