"""The router's early check of a request's grammar (structured outputs), before routing.

xgrammar parses the grammar without a tokenizer here, so a syntax error answers 400 naming
the field at once; the workers compile it against the tokenizer (and cache it). Where
xgrammar is not installed (the router's PEX does not carry it yet) the check is left to the
workers, whose INVALID_ARGUMENT the router answers with 400 too.
"""
from __future__ import annotations

import json

from tandem.v1 import common_pb2


def warm() -> None:
    """Import xgrammar now (seconds: it loads torch), where it is installed."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        pass


def kind_and_spec(so: common_pb2.StructuredOutput) -> tuple[str, str]:
    """(kind, spec) of the proto (spec "" for json_object); ValueError when it names none."""
    kind = so.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured: set one of json_schema, json_object, regex, ebnf")
    if kind == "json_object":
        if not so.json_object:
            raise ValueError("structured.json_object must be true when set")
        return kind, ""
    return kind, getattr(so, kind)


def check_structured(so: common_pb2.StructuredOutput) -> None:
    """Raise ValueError naming the problem."""
    kind, spec = kind_and_spec(so)
    if kind == "json_object":
        return
    if not spec:
        raise ValueError(f"{kind} is empty")
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("json_schema must be a JSON object")
    try:
        import xgrammar as xgr
    except ImportError:
        return
    try:
        if kind == "json_schema":
            xgr.Grammar.from_json_schema(spec, any_whitespace=False, strict_mode=True)
        elif kind == "regex":
            xgr.Grammar.from_regex(spec)
        else:
            xgr.Grammar.from_ebnf(spec)
    except Exception as e:  # xgrammar's errors carry the reason in their first line
        msg = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ValueError(f"{kind} does not compile: {msg}") from None
