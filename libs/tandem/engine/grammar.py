"""Structured output: grammars compiled once (xgrammar) and per-request matchers that fill
the sampler's allow-bitmask rows.

``GrammarBackend.compile(structured)`` turns a ``StructuredOutput`` into an xgrammar
``CompiledGrammar``: compiled once per distinct (kind, spec) and kept in an LRU cache
(compile errors too, so a bad grammar costs one compile). JSON schemas compile in strict
mode (no properties beyond the schema's) with compact separators (``,`` and ``:``, no free
whitespace): a small model cannot loop on whitespace, and the output is the JSON users
parse anyway. ``json_object`` is xgrammar's built-in JSON grammar restricted to an object.

A request's ``GrammarState`` wraps an xgrammar ``GrammarMatcher``: ``fill(mask, row)``
writes the allow-bitmask for the next token into one row of the step's mask (xgrammar's
bitmask layout is the sampler's: int32 words, bit ``j % 32`` of word ``j // 32``), and
``accept(token)`` advances it once the token is sampled, so the mask of step N is built
after step N-1's token is known. After the grammar completes only the stop tokens are
allowed; accepting one terminates the matcher and the engine ends the request ("stop").

The tokenizer the grammar needs is the checkpoint's Hugging Face tokenizer, loaded on the
first structured request (the engine does not need it otherwise).
"""
from __future__ import annotations

import collections
import threading

from tandem.sampling import StructuredOutput

CACHE_SIZE = 256
JSON_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarError(ValueError):
    """The grammar does not compile; the message names the problem."""


class GrammarBackend:
    def __init__(self, model_path: str, vocab_size: int, stop_token_ids: list, max_threads: int = 2):
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_threads = max_threads
        self._compiler = None
        self._no_tokenizer: GrammarError | None = None  # why no grammar can compile (no tokenizer), once known
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.num_compiles = 0  # grammars actually compiled (cache misses)

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError:
                    raise GrammarError("structured outputs need the xgrammar package, which this installation "
                                       "lacks (build-support/setup.sh installs it)") from None
                from transformers import AutoTokenizer

                if self._no_tokenizer is not None:
                    raise self._no_tokenizer
                try:
                    tok = AutoTokenizer.from_pretrained(self.model_path)
                except (OSError, ValueError) as e:  # remembered: every later request gets the same answer at once
                    self._no_tokenizer = GrammarError(
                        f"structured outputs need the model's tokenizer, and none loads from {self.model_path} "
                        f"({_first_line(e)})")
                    raise self._no_tokenizer from None
                info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=False)
            return self._compiler

    def compile(self, so: StructuredOutput):
        """The compiled grammar of ``so`` (cached); raises GrammarError."""
        key = (so.kind, so.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._compile(so)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(hit, GrammarError):
            raise hit
        return hit

    def _compile(self, so: StructuredOutput):
        comp = self._get_compiler()
        self.num_compiles += 1
        try:
            if so.kind == "json_object":
                return comp.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False, strict_mode=False)
            if so.kind == "json_schema":
                return comp.compile_json_schema(so.spec, any_whitespace=False, strict_mode=True)
            if so.kind == "regex":
                return comp.compile_regex(so.spec)
            if so.kind == "ebnf":
                return comp.compile_grammar(so.spec)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses with the reason
            return GrammarError(f"{so.kind} does not compile: {_first_line(e)}")
        return GrammarError(f"unknown structured output kind {so.kind!r}")

    def new_state(self, so: StructuredOutput) -> GrammarState:
        return GrammarState(self.compile(so))


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)

    def fill(self, mask, row: int) -> None:
        """Write the allow-bitmask of the next token into ``mask[row]`` (host int32 [B, W])."""
        self.matcher.fill_next_token_bitmask(mask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def _first_line(e: Exception) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg.splitlines()[0][:300]
