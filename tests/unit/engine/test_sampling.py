"""Sampling options, stop conditions, logprobs and input validation."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from tandem.engine import LLM, SamplingParams


def test_seeded_sampling_reproducible_alone_and_in_batch(dense_llm, prompts):
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = dense_llm.generate([prompts[0]], sp)[0].token_ids
    again = dense_llm.generate([prompts[0]], sp)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True) for i in range(7)]
    batch = dense_llm.generate(prompts[1:8] + [prompts[0]], others + [sp])
    assert alone == again == batch[-1].token_ids
    other_seed = dense_llm.generate([prompts[0]], SamplingParams(max_tokens=16, temperature=0.9, seed=99,
                                                                 ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_any_uint64_seed_samples(dense_llm, prompts):
    """The API's seeds are uint64 (the router's n > 1 adds to them modulo 2**64): the largest
    samples like any other; the sampler keys on the seed's 64 bits."""
    sp = SamplingParams(max_tokens=6, temperature=0.9, seed=2**64 - 1, ignore_eos=True)
    top, small = (dense_llm.generate([prompts[0]], s)[0].token_ids for s in (sp, SamplingParams(
        max_tokens=6, temperature=0.9, seed=5, ignore_eos=True)))
    assert len(top) == 6 and top == dense_llm.generate([prompts[0]], sp)[0].token_ids and top != small


def test_top_k_1_is_greedy_and_min_p(dense_llm, prompts):
    greedy = dense_llm.generate([prompts[2]], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    topk1 = dense_llm.generate([prompts[2]], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3))[0]
    minp = dense_llm.generate([prompts[2]], SamplingParams(max_tokens=8, temperature=1.0, min_p=1.0, seed=3))[0]
    assert topk1.token_ids == greedy == minp.token_ids


def test_stop_token_ids_and_max_tokens(dense_llm, prompts):
    ref = dense_llm.generate([prompts[1]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 12
    stop_tok = ref.token_ids[5]
    first = ref.token_ids.index(stop_tok)
    out = dense_llm.generate([prompts[1]], SamplingParams(max_tokens=12, temperature=0,
                                                          stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[: first + 1]
    later = dense_llm.generate([prompts[1]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok],
                                                            min_tokens=first + 2))[0]
    assert stop_tok not in later.token_ids[: first + 2]


def test_stop_strings(dense_llm, prompts):
    llm = dense_llm
    ref = llm.generate([prompts[9]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert len(ref.text) > 4
    stop = ref.text[2:5]
    out = llm.generate([prompts[9]], SamplingParams(max_tokens=16, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == ref.text[: ref.text.find(stop)]
    assert stop not in out.text
    assert out.token_ids == ref.token_ids[: len(out.token_ids)]


def test_logprobs(dense_llm, prompts):
    out = dense_llm.generate([prompts[0]], SamplingParams(max_tokens=5, temperature=0, logprobs=True,
                                                          top_logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert lp <= 0 and len(top) == 3
        assert top[0][0] == tok and math.isclose(top[0][1], lp, rel_tol=1e-6)  # greedy: the top token


@pytest.mark.parametrize(
    "prompt, sp, match",
    [
        ("", SamplingParams(), "empty prompt"),
        ([], SamplingParams(), "empty prompt"),
        ("x " * 3000, SamplingParams(), "context length"),
        ("hi", SamplingParams(max_tokens=0), "max_tokens"),
        ("hi", SamplingParams(max_tokens=-3), "max_tokens"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_p=1.5), "top_p"),
        ([10**7], SamplingParams(), "token ids"),
    ],
)
def test_bad_input_is_a_clear_value_error(dense_llm, prompt, sp, match):
    with pytest.raises(ValueError, match=match):
        dense_llm.generate([prompt] if isinstance(prompt, str) else prompt or [[]], sp)


def test_unknown_architecture_and_missing_weights(demo_models, tmp_path):
    src = demo_models["dense"]
    bad_arch = tmp_path / "arch"
    shutil.copytree(src, bad_arch, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((bad_arch / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_bigcode", ["GPTBigCodeForCausalLM"]
    (bad_arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model architecture.*gpt_bigcode"):
        LLM(str(bad_arch), device="cpu")
    no_weights = tmp_path / "noweights"
    shutil.copytree(src, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match="missing weights"):
        LLM(str(no_weights), device="cpu")
    partial = tmp_path / "partial"
    shutil.copytree(src, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.torch import load_file, save_file

    t = load_file(os.path.join(src, "model.safetensors"))
    t.pop("model.layers.3.mlp.up_proj.weight")
    save_file(t, str(partial / "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights.*layers.3.mlp.up_proj"):
        LLM(str(partial), device="cpu")


def test_async_stream_matches_generate(dense_llm, prompts):
    import asyncio

    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = dense_llm.generate(prompts[:3], sp)

    async def run():
        async def one(p):
            seen = []
            async for out in dense_llm.generate_stream(p, sp):
                seen.append(len(out.token_ids))
            return out, seen

        return await asyncio.gather(*(one(p) for p in prompts[:3]))

    results = asyncio.run(run())
    for (out, seen), r in zip(results, ref):
        assert out.token_ids == r.token_ids and out.text == r.text and out.finish_reason == "length"
        assert seen == sorted(seen) and len(seen) > 1
