"""The router's tokenizer: prompt encoding, chat templates and token text, from a checkpoint dir."""
from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

from tandem.config.hf_config import context_length, read_hf_config
from tandem.routing.openai_protocol import bad_request

DEFAULT_CONTEXT_LENGTH = 2048


class RouterTokenizer:
    def __init__(self, model_path: str, context_length: int | None = None) -> None:
        from transformers import AutoTokenizer  # heavy import, only where a tokenizer is needed

        if not os.path.isdir(model_path):
            raise ValueError(f"model_path={model_path!r}: not a directory (need the checkpoint's tokenizer files)")
        self.model_path = model_path
        self.hf = AutoTokenizer.from_pretrained(model_path)
        self.context_length = context_length or _context_length(model_path, self.hf)
        self.vocab_size = _vocab_size(model_path)  # the model's (token ids the workers accept); None: unknown
        self.eos_token_id = self.hf.eos_token_id
        self._token_text = lru_cache(maxsize=65536)(self._token_text_uncached)

    def encode(self, text: str) -> list[int]:
        """Tokenize a raw prompt as `tokenizer(text)` does (special tokens such as BOS included)."""
        return list(self.hf(text)["input_ids"])

    @property
    def template_has_tools(self) -> bool:
        return "tools" in (getattr(self.hf, "chat_template", None) or "")

    def render_chat(self, messages: Sequence[dict], tools: Sequence | None = None,
                    tool_format: str = "qwen25") -> str:
        """The chat template of the checkpoint applied to `messages`, with the generation prompt.

        ``tools`` (tool_parsers.Tool) go to the template as ``tools=`` when it renders them;
        for a template without tool support (the demo models') tandem writes them, earlier
        calls and tool results as text in ``tool_format`` (Qwen2.5's wording: a system
        message with the signatures, ``<tool_call>`` for calls, ``<tool_response>`` in a
        user message for results)."""
        if not getattr(self.hf, "chat_template", None):
            raise bad_request(f"The model at {self.model_path} has no chat template; use /v1/completions.",
                              param="messages")
        kw = {}
        msgs = list(messages)
        if tools and self.template_has_tools:
            kw["tools"] = [t.openai() for t in tools]
        elif tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in msgs):
            msgs = _tools_as_text(msgs, tools or [], tool_format)
        try:
            return self.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        except Exception as e:  # template errors (e.g. role order the template rejects) are bad input
            raise bad_request(f"Cannot apply the chat template: {e}", param="messages") from None

    def encode_chat(self, messages: Sequence[dict], tools: Sequence | None = None,
                    tool_format: str = "qwen25") -> list[int]:
        # The template already contains the special tokens (BOS etc.): don't add them twice.
        return list(self.hf(self.render_chat(messages, tools, tool_format), add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._token_text(token_id)

    def _token_text_uncached(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)


def _vocab_size(model_path: str) -> int | None:
    if not os.path.exists(os.path.join(model_path, "config.json")):
        return None
    n = read_hf_config(model_path).get("vocab_size")
    return n if isinstance(n, int) and n > 0 else None


def _context_length(model_path: str, hf) -> int:
    if os.path.exists(os.path.join(model_path, "config.json")):
        n = context_length(read_hf_config(model_path))
        if n is not None:
            return n
    mml = getattr(hf, "model_max_length", None)
    if isinstance(mml, int) and mml < 10**7:
        return mml
    return DEFAULT_CONTEXT_LENGTH


def _tools_as_text(messages: list[dict], tools: Sequence, tool_format: str) -> list[dict]:
    from tandem.routing.tool_parsers import render_call, tools_system_prompt

    out = []
    if tools:
        prompt = tools_system_prompt(list(tools), tool_format)
        if messages and messages[0].get("role") in ("system", "developer"):
            out.append({"role": "system", "content": (messages[0].get("content") or "") + "\n\n" + prompt})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        if m.get("role") == "tool":
            out.append({"role": "user", "content": "<tool_response>\n" + (m.get("content") or "") +
                        "\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(render_call(c, tool_format) for c in m["tool_calls"])
            text = m.get("content") or ""
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    return out
