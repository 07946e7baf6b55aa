"""Reasoning parsers (SGLang's ``--reasoning-parser``): split a reasoning model's ``<think>``
part from its answer, for OpenAI's ``reasoning_content``.

``deepseek-r1``: the chat template opens ``<think>`` itself, so the output starts inside
the reasoning (an opening tag in the output is dropped too) and everything up to
``</think>`` is reasoning. ``qwen3``: reasoning only when the output opens ``<think>``;
otherwise all of it is the answer. Text that may be the start of a tag is held back until
it is known, so streamed deltas never split a tag.
"""
from __future__ import annotations

from tandem.routing.tool_parsers import partial_suffix

THINK_START, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek-r1", "qwen3")


class ReasoningParser:
    def __init__(self, kind: str) -> None:
        if kind not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser {kind!r}: allowed {list(REASONING_PARSERS)}")
        self.kind = kind
        self._buf = ""
        self._state = "start"  # start -> (reasoning -> answer_start ->) answer
        self.entered = False  # whether the output had a reasoning part

    def feed(self, delta: str) -> tuple[str, str]:
        """Add output text; return (reasoning delta, answer delta)."""
        return self._step(self._buf + delta, final=False)

    def finish(self) -> tuple[str, str]:
        """End of output: release what was held back."""
        return self._step(self._buf, final=True)

    def _step(self, buf: str, final: bool) -> tuple[str, str]:
        self._buf = ""
        reasoning = answer = ""
        if self._state == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):
                buf, self._state, self.entered = stripped[len(THINK_START):], "reasoning", True
            elif THINK_START.startswith(stripped) and stripped and not final:
                self._buf = buf  # could still become "<think>"
                return "", ""
            elif not stripped and not final:
                self._buf = buf
                return "", ""
            else:
                self._state = "reasoning" if self.kind == "deepseek-r1" else "answer"
                self.entered = self._state == "reasoning"
        if self._state == "reasoning":
            end = buf.find(THINK_END)
            if end >= 0:
                reasoning, buf, self._state = buf[:end], buf[end + len(THINK_END):], "answer_start"
            else:
                keep = 0 if final else partial_suffix(buf, THINK_END)
                reasoning, self._buf = buf[:len(buf) - keep], buf[len(buf) - keep:]
                return reasoning, ""
        if self._state == "answer_start":  # the newlines between </think> and the answer are no content
            buf = buf.lstrip("\n")
            if not buf:
                return reasoning, ""
            self._state = "answer"
        answer = buf
        return reasoning, answer

    def parse(self, text: str) -> tuple[str | None, str]:
        """Whole output -> (reasoning or None, answer)."""
        r1, a1 = self.feed(text)
        r2, a2 = self.finish()
        return (r1 + r2 if self.entered else None), a1 + a2

