"""Logits and greedy tokens match transformers on the demo checkpoints (float32, CPU)."""
from __future__ import annotations

import pytest
import torch
from tandem.engine import SamplingParams
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def hf_models(demo_models):
    return {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for k, p in demo_models.items()}


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prefill_logits_match_transformers(kind, request, hf_models, prompts):
    llm = request.getfixturevalue(f"{kind}_llm")
    eng = llm.engine
    hf = hf_models[kind]
    prompts = [eng.tokenize(p) for p in prompts[:4]]
    # All prompts in one batch, the longest one split into two chunks: every position's logits.
    from tandem.engine.request import Request

    reqs = []
    for i, ids in enumerate(prompts):
        r = Request(rid=f"p{i}", prompt_ids=ids, sampling=SamplingParams())
        assert eng.scheduler.ensure_pages(r, len(ids))
        reqs.append(r)
    try:
        for r in reqs:
            fb = eng.runner.build([(r, len(r.prompt_ids))])
            fb.logits_indices = torch.arange(len(r.prompt_ids))
            ours = eng.model(fb, eng.pool.k_buffers, eng.pool.v_buffers)
            with torch.no_grad():
                ref = hf(torch.tensor([r.prompt_ids])).logits[0].float()
            assert (ours - ref).abs().max().item() <= 1e-4
        batched = eng.runner.forward([(r, len(r.prompt_ids)) for r in reqs])
        for r, row in zip(reqs, batched):
            with torch.no_grad():
                ref = hf(torch.tensor([r.prompt_ids])).logits[0, -1].float()
            assert (row - ref).abs().max().item() <= 1e-4
    finally:
        for r in reqs:
            eng.pool.free(r.pages)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_tokens_match_transformers_generate(kind, request, hf_models, prompts):
    llm = request.getfixturevalue(f"{kind}_llm")
    hf = hf_models[kind]
    prompts = prompts[:8]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ids = torch.tensor([o.prompt_token_ids])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False)[0, ids.shape[1]:].tolist()
        assert o.token_ids == ref, p
        assert o.finish_reason == "length"
