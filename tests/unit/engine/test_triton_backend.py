"""The triton attention backend end to end on CPU (kernels through the Triton interpreter):
the same greedy and seeded tokens as the torch_native reference, on both demo models."""
from __future__ import annotations

import pytest
from tandem.engine import LLM, SamplingParams
from tandem.engine.cuda_graph_runner import graph_buckets

PROMPTS = ["The GNU General Public License is", "import os\nimport sys\n"]


@pytest.mark.parametrize("kind,prompts,max_tokens", [("dense", PROMPTS, 4), ("moe", PROMPTS[:1], 3)])
def test_triton_backend_tokens_match_torch_native(kind, prompts, max_tokens, demo_models, make_llm):
    path = demo_models[kind]
    # page size 4: prompts straddle many pages and decode crosses page boundaries
    ref = make_llm(path, attention_backend="torch_native", page_size=4)
    tri = make_llm(path, attention_backend="triton", page_size=4)
    assert tri.engine.attention_backend == "triton" and tri.engine.cuda_graph_max_bs == 0  # no graphs on CPU
    for sp in (SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
               SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=40, top_p=0.95, seed=5, ignore_eos=True)):
        want = [o.token_ids for o in ref.generate(prompts, sp)]
        assert [o.token_ids for o in tri.generate(prompts, sp)] == want


def test_triton_on_cpu_needs_the_interpreter(demo_models, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        LLM(demo_models["dense"], device="cpu", attention_backend="triton", max_total_tokens=256)


def test_cpu_defaults(dense_llm):
    eng = dense_llm.engine
    assert eng.attention_backend == "torch_native" and eng.cuda_graph_max_bs == 0
    assert eng.chunked_prefill_size == 512


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
