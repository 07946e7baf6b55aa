"""Embedding passes (--is-embedding) against transformers: the same checkpoint's final hidden
states, pooled in plain torch (last / mean / cls), truncated (dimensions) and normalised or not,
equal the engine's to 1e-5 in float32; a batch of 64 mixed-length inputs packed into several
passes; pages all back after each pass; the pooling read from sentence-transformers files."""
from __future__ import annotations

import json
import os

import pytest
import torch
from tandem.config.schemas import DecodeConfig, EngineConfig, PrefillConfig
from tandem.engine import EngineCore, SamplingParams
from tandem.engine.embedding import Embedder
from tandem.engine.pooling import PoolingConfig, read_sentence_transformers, resolve_pooling

from deploy.demo_models import EMBED_SPEC, build_all, write_sentence_transformers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def path():
    return build_all(os.path.join(REPO, "models"), log=lambda *_: None)[EMBED_SPEC["name"]]


@pytest.fixture(scope="module")
def engine(path):
    # A 128-token budget: the 64-input batch below needs several packed passes.
    return EngineCore(path, is_embedding=True, device="cpu", dtype="float32", max_total_tokens=4096,
                      chunked_prefill_size=128)


@pytest.fixture(scope="module")
def hf_hidden(path):
    """ids -> transformers' final hidden states [n, H] (float32) of the same checkpoint."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    def run(ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return run


def reference(hf_hidden, inputs, method, normalize, dims=None):
    rows = []
    for ids in inputs:
        h = hf_hidden(ids)
        v = {"last": h[-1], "mean": h.mean(0), "cls": h[0]}[method]
        v = v[:dims] if dims else v
        rows.append(torch.nn.functional.normalize(v, dim=-1) if normalize else v)
    return torch.stack(rows)


def embedder(engine, method, normalize) -> Embedder:
    return Embedder(engine.runner, engine.pool, PoolingConfig(method, normalize), engine.chunked_prefill_size,
                    engine.context_length, engine.model_config.vocab_size, engine.model_config.hidden_size)


INPUTS = [[5, 17, 300, 42, 7, 0], [1000, 2000, 3000], [9] * 40, [77]]


@pytest.mark.parametrize("method", ["last", "mean", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dims", [None, 48])
def test_pooling_equals_transformers(engine, hf_hidden, method, normalize, dims):
    out = embedder(engine, method, normalize).embed(INPUTS, dims)
    want = reference(hf_hidden, INPUTS, method, normalize, dims)
    assert out.vectors.shape == want.shape == (len(INPUTS), dims or engine.model_config.hidden_size)
    torch.testing.assert_close(out.vectors, want, atol=1e-5, rtol=0)
    assert out.num_tokens == [len(x) for x in INPUTS] and out.normalized == normalize
    assert engine.pool.num_free_pages == engine.pool.num_pages  # no KV kept after the pass


def test_batch_of_64_mixed_lengths_in_packed_passes(engine, hf_hidden):
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randint(0, 8000, (n,), generator=g).tolist()
              for n in torch.randint(1, 200, (64,), generator=g).tolist()]
    before = engine.embedder.passes
    out = engine.embed(inputs)  # the checkpoint's own pooling: last token, normalised
    passes = engine.embedder.passes - before
    assert passes == len(engine.embedder.plan([len(x) for x in inputs])) > 1
    torch.testing.assert_close(out.vectors, reference(hf_hidden, inputs, "last", True), atol=1e-5, rtol=0)
    assert engine.pool.num_free_pages == engine.pool.num_pages
    assert engine.stats().prompt_tokens_total >= sum(len(x) for x in inputs)


def test_plan_packs_within_budget(engine):
    plan = engine.embedder.plan([100, 20, 10, 300, 5, 128])
    assert plan == [[0, 1], [2], [3], [4], [5]]  # 100+20 fit 128; 300 runs alone


def test_triton_backend_equals_transformers(path, hf_hidden):
    """The GPU path (paged extend kernels, here through the Triton interpreter), mean pooling."""
    eng = EngineCore(path, is_embedding=True, device="cpu", dtype="float32", max_total_tokens=1024,
                     attention_backend="triton", pooling="mean", embedding_normalize="off")
    inputs = [[5, 17, 300, 42, 7], [1000, 2000, 3000, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [3]]
    torch.testing.assert_close(eng.embed(inputs).vectors, reference(hf_hidden, inputs, "mean", False),
                               atol=1e-5, rtol=0)


def test_bad_batches_name_the_field(engine):
    for inputs, dims, field in [([], None, "input"), ([[1], []], None, "input[1]"), ([[1, 8192]], None, "input[0]"),
                                ([[1] * 1025], None, "input[0]"), ([[1]], 257, "dimensions")]:
        with pytest.raises(ValueError, match=rf"^{field.replace('[', '.').replace(']', '.')}:"):
            engine.embed(inputs, dims)
    with pytest.raises(ValueError, match="serves embeddings"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))


def test_flags_override_the_checkpoint(path):
    assert resolve_pooling(path) == PoolingConfig("last", True, "sentence-transformers")
    assert resolve_pooling(path, "mean", False) == PoolingConfig("mean", False, "flags")
    assert resolve_pooling(path, "cls").normalize is True  # the checkpoint's Normalize still applies


def test_sentence_transformers_files(tmp_path):
    assert read_sentence_transformers(str(tmp_path)) is None
    assert resolve_pooling(str(tmp_path)) == PoolingConfig("last", True, "default")
    for mode, method in [("mean", "mean"), ("cls", "cls"), ("lasttoken", "last")]:
        write_sentence_transformers(str(tmp_path), 64, mode, normalize=False)
        assert read_sentence_transformers(str(tmp_path)) == PoolingConfig(method, False, "sentence-transformers")
    write_sentence_transformers(str(tmp_path), 64, "mean", normalize=True)
    assert read_sentence_transformers(str(tmp_path)).normalize
    cfg = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    cfg["pooling_mode_max_tokens"] = True
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        read_sentence_transformers(str(tmp_path))
    write_sentence_transformers(str(tmp_path), 64, "mean", normalize=True)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        read_sentence_transformers(str(tmp_path))


def test_config_refuses_what_it_would_ignore():
    with pytest.raises(ValueError, match="only with is_embedding"):
        EngineConfig(pooling="mean")
    with pytest.raises(ValueError, match="enable_hierarchical_cache"):
        EngineConfig(is_embedding=True, enable_hierarchical_cache=True)
    with pytest.raises(ValueError, match="not with tp_size"):  # the embedder's pass is not mirrored on followers
        EngineConfig(is_embedding=True, tp_size=2)
    with pytest.raises(ValueError, match="aggregated"):
        DecodeConfig(is_embedding=True, disaggregation_mode="decode", prefill_addresses=["x:1"])
    with pytest.raises(ValueError, match="aggregated"):
        PrefillConfig(is_embedding=True)
