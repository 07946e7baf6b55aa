"""--enable-deterministic-inference end to end on CPU (Triton interpreter, float32): a seeded
request gets the same tokens and bit-identical logprobs alone and inside mixed batches with a
prefix-cache hit and chunked prefill, on both demo models; no batch-variant matmul runs in a
prefill or decode step (the TorchDispatchMode guard); the flag's configuration errors."""
from __future__ import annotations

import pytest
import torch
from tandem.config import EngineConfig
from tandem.engine import LLM, SamplingParams
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose CUDA kernels (cuBLAS / cuBLASLt) choose tiles and split-K by the shape, the row
# count included: a row's result depends on its batch.
BATCH_VARIANT_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm", "addmv", "mv", "dot",
                     "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                     "scaled_dot_product_attention", "einsum"}


class MatmulGuard(TorchDispatchMode):
    """Records the batch-variant aten ops that run under it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in BATCH_VARIANT_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _ids(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 8000, (n,), generator=g).tolist()


def _steps(eng, requests):
    """Run ``requests`` [(name, ids, sp[, LoRA adapter])] (all queued at once) to the end. Returns ({name:
    (tokens, logprobs, cached tokens)}, [(kind, {name: new tokens})] of every forward pass)."""
    names = {eng.add_request(ids, sp, lora_name=(lora or [None])[0]): name for name, ids, sp, *lora in requests}
    out = {name: ([], [], 0) for name in names.values()}
    passes = []
    schedule = eng.scheduler.schedule

    def recording():
        batch = schedule()
        if batch.items:
            passes.append((batch.kind, {names.get(r.rid, r.rid): n for r, n in batch.items}))
        return batch

    eng.scheduler.schedule = recording  # test instrumentation: which rows ride together
    try:
        while eng.has_work():
            for o in eng.step():
                toks, lps, _ = out[names[o.rid]]
                out[names[o.rid]] = (toks + o.new_token_ids, lps + o.new_logprobs, o.cached_tokens)
    finally:
        del eng.scheduler.schedule
    return out, passes


SEEDED = SamplingParams(max_tokens=5, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True, logprobs=True)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True)


def _alone_vs_mixed(llm, target: list[int], warm: list[int], long_prompts: list[list[int]]):
    """The target alone (empty cache), then with a cached prefix (``warm``'s prompt), queued with long
    prompts that are chunked while it decodes. Returns (alone, mixed run, passes of the mixed run)."""
    eng = llm.engine
    eng.flush_cache()
    alone, _ = _steps(eng, [("target", target, SEEDED)])
    eng.flush_cache()
    _steps(eng, [("warm", warm, SamplingParams(max_tokens=1))])
    others = [(f"long{i}", p, GREEDY) for i, p in enumerate(long_prompts)]
    mixed, passes = _steps(eng, others[:1] + [("target", target, SEEDED)] + others[1:])
    return alone["target"], mixed, passes


@pytest.mark.slow
def test_seeded_request_alone_equals_inside_mixed_batches_dense(demo_models, make_llm):
    llm = make_llm(demo_models["dense"], enable_deterministic_inference=True, page_size=4, chunked_prefill_size=24,
                   enable_mixed_chunk=True)
    assert type(llm.engine.model.ops).__name__ == "DeterministicTritonOps"
    target = _ids(1, 40)
    alone, mixed, passes = _alone_vs_mixed(llm, target, target[:26] + _ids(2, 6), [_ids(3, 30), _ids(4, 50)])
    assert alone[2] == 0 and mixed["target"][2] == 24  # a prefix hit: 6 cached pages of 4 tokens
    # The target's prompt ran in other chunks than alone, and its decode rows rode in prefill chunks' batches.
    target_chunks = [p["target"] for _, p in passes if p.get("target", 1) > 1]
    assert target_chunks and target_chunks != [24, 16]
    assert any(p.get("target") == 1 and any(n > 1 for n in p.values()) for _, p in passes)
    assert any(p.get("target") == 1 and len(p) > 1 and kind == "decode" for kind, p in passes)
    assert mixed["target"][0] == alone[0] and len(alone[0]) == 5
    assert mixed["target"][1] == alone[1]  # logprobs bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("flag", [True, False], ids=["deterministic", "default-negative-control"])
def test_seeded_request_alone_equals_inside_mixed_batches_moe(demo_models, make_llm, flag):
    """Without the flag (the same triton backend, float32) the logprobs differ in their last bits: the
    comparison can fail, and the flag's kernels are what makes it hold."""
    llm = make_llm(demo_models["moe"], enable_deterministic_inference=flag, attention_backend="triton", page_size=4,
                   chunked_prefill_size=16, enable_mixed_chunk=True)
    target = _ids(5, 20)
    alone, mixed, passes = _alone_vs_mixed(llm, target, target[:13] + _ids(6, 3), [_ids(7, 20), _ids(9, 40)])
    assert mixed["target"][2] == 12
    assert any(p.get("target") == 1 and any(n > 1 for n in p.values()) for _, p in passes)
    same = mixed["target"][0] == alone[0] and mixed["target"][1] == alone[1]
    assert same == flag, (alone, mixed["target"])


@pytest.mark.slow
def test_lora_request_alone_equals_inside_batches_mixing_adapters(demo_models, make_llm, tmp_path_factory):
    """With --enable-lora the flag holds too: a seeded request under adapter a gets the same tokens and
    logprobs alone as in chunked batches mixing adapter b (another rank) and the base model, its decode
    rows riding in prefill chunks; no batch-variant matmul runs (the LoRA deltas are the SGMV kernels
    with one fixed row tile), and the adapter does change the request's output."""
    from deploy.demo_lora import ATTN, build_adapter

    # Attention projections only: every LoRA launch runs in the Triton interpreter here (the MLP's
    # deltas are the same kernels; test_lora.py covers them).
    root, m = tmp_path_factory.mktemp("det-loras"), demo_models["dense"]
    paths = {"a": build_adapter(m, str(root / "a"), rank=8, targets=ATTN, seed=1),
             "b": build_adapter(m, str(root / "b"), rank=4, targets=ATTN, seed=2)}
    # Small shapes: every linear runs the Triton interpreter's fixed-tile kernels here.
    llm = make_llm(m, enable_deterministic_inference=True, page_size=4, chunked_prefill_size=12,
                   enable_mixed_chunk=True, lora_paths=[f"{n}={p}" for n, p in paths.items()])
    eng, target = llm.engine, _ids(1, 16)
    alone, _ = _steps(eng, [("target", target, SEEDED, "a")])
    base, _ = _steps(eng, [("target", target, SEEDED)])
    eng.flush_cache()
    with MatmulGuard() as guard:
        mixed, passes = _steps(eng, [("long0", _ids(3, 14), GREEDY, "b"), ("target", target, SEEDED, "a"),
                                     ("long1", _ids(4, 24), GREEDY)])
    assert guard.seen == []
    assert any(p.get("target") == 1 and any(n > 1 for n in p.values()) for _, p in passes)
    assert mixed["target"][0] == alone["target"][0] and len(alone["target"][0]) == 5
    assert mixed["target"][1] == alone["target"][1]  # logprobs bit for bit
    assert base["target"][1] != alone["target"][1]


def test_no_batch_variant_matmul_in_a_prefill_or_decode_step(demo_models, make_llm):
    """The guard: with the flag, a prefill step and decode steps run no cuBLAS-style matmul; without it
    (the same backend) the linears do, so the guard can fail."""
    found = {}
    for flag in (True, False):
        llm = make_llm(demo_models["dense"], enable_deterministic_inference=flag, attention_backend="triton",
                       page_size=4)
        eng = llm.engine
        eng.add_request(_ids(8, 12), SamplingParams(max_tokens=3, temperature=0.7, seed=1, ignore_eos=True,
                                                    logprobs=True, top_logprobs=2))
        kinds = []
        with MatmulGuard() as guard:
            while eng.has_work():
                eng.step()
                kinds.append(eng.stats().step_kind)
        assert "prefill" in kinds and "decode" in kinds
        found[flag] = sorted(set(guard.seen))
    assert found[True] == []
    assert {"addmm", "mm", "linear", "matmul"} & set(found[False]), found[False]


def test_configuration_errors_name_the_field(demo_models, monkeypatch):
    with pytest.raises(ValueError, match="enable_deterministic_inference needs attention_backend='triton'"):
        EngineConfig(model_path=demo_models["dense"], enable_deterministic_inference=True,
                     attention_backend="torch_native")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="enable_deterministic_inference .* TRITON_INTERPRET=1"):
        LLM(demo_models["dense"], device="cpu", enable_deterministic_inference=True, max_total_tokens=256)


def test_fp8_with_the_flag_runs_one_fixed_kernel(demo_models):
    from tandem.engine.quantization import Fp8Gemm

    with pytest.raises(ValueError, match="fp8_gemm_backend='scaled_mm' is not batch-invariant"):
        Fp8Gemm("scaled_mm", "cpu", deterministic=True)
    with pytest.raises(ValueError, match="fp8_gemm_backend='torch' is not batch-invariant"):
        Fp8Gemm("torch", "cpu", deterministic=True)
