"""The router's early check of a request's grammar (structured outputs), before routing.

xgrammar parses the grammar without a tokenizer here, so a syntax error answers 400 naming
the field at once; the workers compile it against the tokenizer (and cache it). Where
xgrammar is not installed (the router's PEX does not carry it yet) the check is left to the
workers, whose INVALID_ARGUMENT the router answers with 400 too.
"""
from __future__ import annotations

from tandem.sampling import StructuredOutput


def warm() -> None:
    """Import xgrammar now (seconds: it loads torch), where it is installed."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        pass


def check_structured(so: StructuredOutput) -> None:
    """Raise ValueError naming the problem (the grammar's own rules, then whether it parses)."""
    so.validate()
    if so.kind == "json_object":
        return
    try:
        import xgrammar as xgr
    except ImportError:
        return
    try:
        if so.kind == "json_schema":
            xgr.Grammar.from_json_schema(so.spec, any_whitespace=False, strict_mode=True)
        elif so.kind == "regex":
            xgr.Grammar.from_regex(so.spec)
        else:
            xgr.Grammar.from_ebnf(so.spec)
    except Exception as e:  # xgrammar's errors carry the reason in their first line
        msg = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise ValueError(f"{so.kind} does not compile: {msg}") from None
