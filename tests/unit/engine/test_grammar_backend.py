"""The grammar backend on a checkpoint without a tokenizer (the benchmark shapes are built without
one): a structured-output request gets a GrammarError that says so, and later requests get the same
answer without loading the tokenizer again."""
from __future__ import annotations

import pytest
import transformers
from tandem.engine import StructuredOutput
from tandem.engine.grammar import GrammarBackend, GrammarError


def test_no_tokenizer_is_a_clear_grammar_error_given_once(tmp_path, monkeypatch):
    pytest.importorskip("xgrammar")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    loads = []
    real = transformers.AutoTokenizer.from_pretrained

    def counted(*a, **kw):
        loads.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counted)
    backend = GrammarBackend(str(tmp_path), vocab_size=128, stop_token_ids=[2])
    for _ in range(2):
        with pytest.raises(GrammarError, match="structured outputs need the model's tokenizer") as err:
            backend.new_state(StructuredOutput("regex", "[0-9]+"))
        assert str(tmp_path) in str(err.value)
    assert len(loads) == 1
