"""Tool calls: parsers of each model family's call format (SGLang's ``--tool-call-parser``),
the grammars that force calls (``tool_choice`` required / a named function) and the tool
prompt for chat templates that have no tool support.

Formats:

* ``qwen25`` / ``hermes`` (Qwen2.5, Qwen3, Hermes): each call is
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, text around them is
  content.
* ``llama3`` (Llama 3.1/3.2 JSON tool calling): the output is ``{"name": ...,
  "parameters": {...}}`` (``arguments`` accepted too), optionally after
  ``<|python_tag|>``, several calls separated by ``;``; output that does not start as
  such JSON is content.

Streaming: ``feed(delta)`` returns (content delta, calls completed in it); content that may
be the start of a call is held back until it is known. A call is sent once, complete
(name and all its arguments), when its closing text arrives: a valid
``delta.tool_calls`` stream. An unclosed or unparsable call at the end is returned as
content, as SGLang does.

Forced calls: ``tool_choice`` "required" makes the output a JSON array of
``{"name": <one of the tools>, "parameters": {...}}`` (at least one item; one when
``parallel_tool_calls`` is false); a named function makes it that function's arguments
object. Both are JSON schemas enforced by the grammar backend, so they parse.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

TOOL_CALL_PARSERS = ("qwen25", "hermes", "llama3")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: dict | None = None

    def schema(self) -> dict:
        return self.parameters if self.parameters else {"type": "object", "properties": {}}

    def openai(self) -> dict:
        fn = {"name": self.name, "parameters": self.schema()}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


def check_tool_name(name: str) -> None:
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"tool name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")


def _call_from_obj(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments already as text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """Base: streaming and whole-output parsing on the same state machine."""

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        c1, t1 = self.feed(text)
        c2, t2 = self.finish()
        return c1 + c2, t1 + t2


class HermesToolParser(ToolParser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._after_call = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        content, calls = "", []
        while True:
            if self._after_call:  # whitespace between calls (and after the last) is no content
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return content, calls
                self._after_call = False
            if not self._in_call:
                i = self._buf.find(self.START)
                if i < 0:
                    keep = partial_suffix(self._buf, self.START)
                    content += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return content, calls
                content += self._buf[:i]
                self._buf, self._in_call = self._buf[i + len(self.START):], True
            j = self._buf.find(self.END)
            if j < 0:
                return content, calls
            body, self._buf, self._in_call = self._buf[:j], self._buf[j + len(self.END):], False
            call = _parse_json_call(body)
            if call is None:
                content += self.START + body + self.END
            else:
                calls.append(call)
                self._after_call = True

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            call = _parse_json_call(rest)
            return ("", [call]) if call is not None else (self.START + rest, [])
        return rest, []


class Llama3ToolParser(ToolParser):
    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        self._buf = ""
        self._mode = "start"  # start -> content | calls

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        if self._mode == "content":
            return delta, []
        self._buf += delta
        if self._mode == "start":
            s = self._buf.lstrip()
            if not s or self.TAG.startswith(s):
                return "", []
            if s.startswith(self.TAG) or s.startswith("{"):
                self._mode = "calls"
            else:
                self._mode, out, self._buf = "content", self._buf, ""
                return out, []
        return "", []  # calls: parsed whole at the end (they are one JSON text)

    def finish(self) -> tuple[str, list[ToolCall]]:
        buf, self._buf = self._buf, ""
        if self._mode != "calls":
            return buf, []
        text = buf.strip()
        if text.startswith(self.TAG):
            text = text[len(self.TAG):].strip()
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(text):
            try:
                obj, end = decoder.raw_decode(text, pos)
            except ValueError:
                return buf, []
            call = _call_from_obj(obj)
            if call is None:
                return buf, []
            calls.append(call)
            pos = end
            while pos < len(text) and text[pos] in " \n\t;":
                pos += 1
        return "", calls


class ForcedToolParser(ToolParser):
    """Output forced by tool_choice "required" (an array of calls) or a named function (its
    arguments object): parsed whole at the end; nothing is content."""

    def __init__(self, named: str | None) -> None:
        self.named = named
        self._buf = ""

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._buf = self._buf, ""
        try:
            obj = json.loads(text)
        except ValueError:
            return text, []  # cut short (max_tokens): hand back what there is
        if self.named is not None:
            return ("", [ToolCall(self.named, json.dumps(obj, ensure_ascii=False))]) if isinstance(obj, dict) \
                else (text, [])
        calls = [_call_from_obj(o) for o in obj] if isinstance(obj, list) else [None]
        if not calls or any(c is None for c in calls):
            return text, []
        return "", calls


def make_parser(kind: str) -> ToolParser:
    if kind in ("qwen25", "hermes"):
        return HermesToolParser()
    if kind == "llama3":
        return Llama3ToolParser()
    raise ValueError(f"tool call parser {kind!r}: allowed {list(TOOL_CALL_PARSERS)}")


def forced_schema(tools: list[Tool], choice: str, parallel: bool = True) -> dict:
    """The JSON schema that forces calls: choice "required" or a tool's name."""
    if choice != "required":
        tool = next(t for t in tools if t.name == choice)
        return tool.schema()
    items = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.schema()},
                        "required": ["name", "parameters"]} for t in tools]}
    schema = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tools_system_prompt(tools: list[Tool], parser: str) -> str:
    """The tool instructions for a chat template without tool support, in the parser's format
    (Qwen2.5's wording for the <tool_call> format)."""
    specs = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
    if parser == "llama3":
        return ("You have access to the following functions. To call a function, respond with a JSON object "
                '{"name": function name, "parameters": dictionary of argument name and its value}, '
                "and nothing else.\n\n" + specs)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + specs +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render_call(call: dict, parser: str) -> str:
    """An earlier assistant call as the model writes it (for templates without tool support)."""
    fn = call.get("function", call)
    args = fn.get("arguments", "{}")
    try:
        args_obj = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        args_obj = args
    if parser == "llama3":
        return json.dumps({"name": fn.get("name"), "parameters": args_obj}, ensure_ascii=False)
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args_obj}, ensure_ascii=False) + \
        "\n</tool_call>"


def _parse_json_call(body: str) -> ToolCall | None:
    try:
        return _call_from_obj(json.loads(body.strip()))
    except ValueError:
        return None


def partial_suffix(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
