"""GPU correctness of the triton backend (kernels, CUDA graphs, sampler) against the torch path.

CI has no GPU, so this script is the GPU half of the tests (the CPU half runs the same
kernels through the Triton interpreter in `make test`). It records every check with
its measured value and verdict:

* kernels on CUDA vs their torch references, bf16 and float32: rotary + K/V write,
  RMSNorm (+residual), SiLU-and-mul bit-exact in bf16; paged decode attention within
  a stated tolerance; the Gumbel sampling kernel draws the same tokens as the torch
  Philox reference;
* both demo models in float32: greedy tokens of the triton backend with CUDA graphs
  (dense) identical to the torch_native path;
* decode logits on one KV pool: graph replay == eager triton (bitwise); triton's bf16 error
  against a float32 reference (same weights, torch_native) at most 1.5x torch_native's own bf16
  error against it;
* sampling: the captured sampler graph draws the same seeded tokens as eager sampling
  (plain, and with penalties + logit bias + a grammar mask), and a seeded request (with
  penalties too) draws the same tokens alone and inside a batch.

    python benchmarks/gpu_engine_check.py --out benchmarks/results/gpu/engine_check_h200.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from tandem.engine import LLM, SamplingParams  # noqa: E402

from benchmarks.common.results import command_line, git_info, machine_info, write_json  # noqa: E402

BF16_ATTN_TOL = 2e-2  # paged decode attention vs float32-softmax reference, bf16 outputs
# Decode logits of the triton path in bf16 are judged against a float32 reference (the same weights,
# torch_native in float32): their error may be at most this multiple of the error of the torch_native
# path in bf16 against the same reference. The tolerance comes from the reference, not from the
# difference it judges: bf16 rounding of the weights and activations sets the scale.
BF16_ERR_RATIO = 1.5

checks: list[dict] = []


def record(name: str, value, ok: bool, detail: str = "") -> None:
    checks.append({"check": name, "value": value, "ok": bool(ok), "detail": detail})
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {value} {detail}", flush=True)


def kernel_checks(dev: str) -> None:
    from tandem.engine.kernels import activation, decode_attention, norm, rope_kv, sampling

    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).replace("torch.", "")
        T, H, KVH, D = 37, 28, 4, 128
        qkv = torch.randn(T, (H + 2 * KVH) * D, device=dev, generator=g).to(dtype)
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
        cos, sin = rope_kv.rope_cos_sin_cache(inv, 4096)
        pos = torch.randint(0, 4096, (T,), device=dev, generator=g)
        slots = torch.randperm(64 * 16, device=dev, generator=g)[:T]
        slots[3] = -1
        res = []
        for fn in (rope_kv.rope_and_write_kv, rope_kv.rope_and_write_kv_ref):
            x = qkv.clone()
            kc = torch.zeros(64, 16, KVH, D, device=dev, dtype=dtype)
            vc = torch.zeros_like(kc)
            q = x[:, : H * D].view(T, H, D)
            fn(q, x[:, H * D:(H + KVH) * D].view(T, KVH, D), x[:, (H + KVH) * D:].view(T, KVH, D), pos, cos, sin,
               slots, kc, vc)
            res.append((q.clone(), kc, vc))
        diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(*res)]
        record(f"rope+kv write {tag} max diff (q, k cache, v cache)", diffs, max(diffs) <= (1.6e-2 if tag == "bfloat16" else 1e-6),
               f"bit-exact: {[torch.equal(a, b) for a, b in zip(*res)]}")
        x = torch.randn(T, 4096, device=dev, generator=g).to(dtype)
        r = torch.randn(T, 4096, device=dev, generator=g).to(dtype)
        w = torch.randn(4096, device=dev, generator=g).to(dtype)
        a, ra = norm.rms_norm(x, w, 1e-6, r.clone())
        b, rb = norm.rms_norm_ref(x, w, 1e-6, r.clone())
        diff = (a.float() - b.float()).abs().max().item()
        record(f"rms_norm+residual {tag} max diff", diff, torch.equal(ra, rb) and diff <= (0.07 if tag == "bfloat16" else 1e-4),
               "(residual bit-exact; normalised value: reduction order only)")
        gu = torch.randn(T, 2 * 4864, device=dev, generator=g).to(dtype)
        diff = (activation.silu_and_mul(gu).float() - activation.silu_and_mul_ref(gu).float()).abs().max().item()
        record(f"silu_and_mul {tag} max diff", diff, diff <= (0.0 if tag == "bfloat16" else 1e-5),
               "(bf16: bit-exact required; float32: exp approximation)")
        for ps, H, KVH, lens, splits in ((1, 8, 8, [1, 77, 0], 4), (16, 14, 2, [300, 17, 4096], 8),
                                         (128, 32, 8, [129, 1000], 16), (256, 28, 4, [5000], 1)):
            npages = sum(-(-n // ps) for n in lens) + 4
            kc = torch.randn(npages, ps, KVH, 128, device=dev, generator=g).to(dtype)
            vc = torch.randn(npages, ps, KVH, 128, device=dev, generator=g).to(dtype)
            width = max(-(-n // ps) for n in lens) + 1
            table = torch.stack([torch.randperm(npages, device=dev, generator=g)[:width] for _ in lens]).int()
            q = torch.randn(len(lens), H, 128, device=dev, generator=g).to(dtype)
            sl = torch.tensor(lens, device=dev, dtype=torch.int32)
            out = decode_attention.paged_decode_attention(q, kc, vc, table, sl, 128**-0.5, splits)
            ref = decode_attention.paged_decode_attention_ref(q, kc, vc, table, sl, 128**-0.5)
            diff = (out.float() - ref.float()).abs().max().item()
            tol = BF16_ATTN_TOL if tag == "bfloat16" else 1e-4
            record(f"paged decode attention {tag} page {ps} GQA {H // KVH} lens {lens} splits {splits}", diff,
                   diff <= tol, f"(tolerance {tol})")
    V = 151936
    scores = torch.randn(64, V, device=dev, generator=g) * 4
    scores[5, 1000:] = float("-inf")
    seeds = torch.randint(0, 2**62, (64,), device=dev, generator=g)
    pos = torch.randint(0, 2**20, (64,), device=dev, generator=g)
    same = (sampling.gumbel_argmax(scores, seeds, pos) == sampling.gumbel_argmax_ref(scores, seeds, pos)).sum().item()
    record("gumbel sampling kernel == torch Philox reference (rows)", f"{same}/64", same == 64)


def free_device() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def tokens(llm, prompts, sp):
    return [o.token_ids for o in llm.generate(prompts, sp)]


def model_checks(dev: str) -> None:
    prompts = ["The license", "def main(argv=None):", "Hello world, this is a test of", "import os\nimport sys\n",
               "Copyright (C) 2007 Free Software Foundation", "x" * 40, "for i in range(10):", "# tandem"]
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for name in ("tandem-demo-dense", "tandem-demo-moe"):
        path = str(REPO / "models" / name)
        ref = LLM(path, device=dev, dtype="float32", attention_backend="torch_native", max_total_tokens=1 << 16)
        want = tokens(ref, prompts, greedy)
        del ref
        free_device()
        llm = LLM(path, device=dev, dtype="float32", max_total_tokens=1 << 16)
        got = tokens(llm, prompts, greedy)
        same = sum(a == b for a, b in zip(got, want))
        record(f"{name} float32 greedy: triton (CUDA graphs up to {llm.engine.cuda_graph_max_bs}) == torch_native",
               f"{same}/{len(prompts)}", same == len(prompts))
        seeded = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True,
                                logprobs=True, top_logprobs=2)
        # Like for like: `waiting` starts with an empty prefix cache, so this run must too (with the
        # greedy prompts cached, prefill runs over cached pages and fp32 logprobs differ in the last bits).
        llm.engine.flush_cache()
        overlapped = [(o.token_ids, o.logprobs) for o in llm.generate(prompts, seeded)]
        del llm
        free_device()
        waiting = LLM(path, device=dev, dtype="float32", max_total_tokens=1 << 16, disable_overlap_schedule=True)
        want_seeded = [(o.token_ids, o.logprobs) for o in waiting.generate(prompts, seeded)]
        same = sum(a == b for a, b in zip(overlapped, want_seeded))
        record(f"{name} float32 seeded + logprobs: overlap scheduling == --disable-overlap-schedule",
               f"{same}/{len(prompts)}", same == len(prompts))
        del waiting
        free_device()


def decode_batch(eng, g: torch.Generator) -> list:
    """Eight requests with prompts of 99..358 random tokens (from ``g``) and pages for one decode step."""
    from tandem.engine.request import Request

    reqs = []
    for i in range(8):
        ids = torch.randint(10, eng.model_config.vocab_size, (100 + 37 * i,), generator=g).tolist()
        r = Request(rid=f"c{i}", prompt_ids=ids[:-1], sampling=SamplingParams(), output_ids=[ids[-1]])
        assert eng.scheduler.ensure_pages(r, len(ids))
        reqs.append(r)
    return reqs


def reference_logits(dev: str, model: str) -> torch.Tensor:
    """The decode batch's logits with the same weights in float32 on the torch_native path (on the host)."""
    llm = LLM(model, device=dev, dtype="float32", attention_backend="torch_native", max_total_tokens=1 << 16)
    eng = llm.engine
    reqs = decode_batch(eng, torch.Generator().manual_seed(3))
    with torch.inference_mode():
        eng.runner.forward([(r, len(r.prompt_ids)) for r in reqs])
        for r in reqs:
            r.num_computed = len(r.prompt_ids)
        out = eng.runner.forward([(r, 1) for r in reqs]).float().cpu()
    del llm, eng, reqs
    free_device()
    return out


def logits_checks(dev: str, model: str) -> None:
    """One KV pool, one decode batch: graph replay vs eager triton vs torch_native logits (bf16),
    both judged against a float32 reference."""
    from tandem.engine.ops import TorchNativeOps

    ref = reference_logits(dev, model)
    llm = LLM(model, device=dev, dtype="bfloat16", max_total_tokens=1 << 16)
    eng = llm.engine
    runner = eng.runner
    g = torch.Generator().manual_seed(3)
    reqs = decode_batch(eng, g)
    with torch.inference_mode():
        runner.forward([(r, len(r.prompt_ids)) for r in reqs])  # prefill the prompts' KV
        for r in reqs:
            r.num_computed = len(r.prompt_ids)
        batch = [(r, 1) for r in reqs]
        graph = runner.forward(batch).clone()
        eager = eng.model(runner._build_paged_decode(batch), eng.pool.k_buffers, eng.pool.v_buffers)
        record("graph replay == eager triton (decode logits, bf16, batch 8)", torch.equal(graph, eager),
               torch.equal(graph, eager))
        triton_ops = eng.model.ops
        eng.model.ops = TorchNativeOps(eng.model.rotary)
        dense = eng.model(runner._build_dense(batch), eng.pool.k_buffers, eng.pool.v_buffers)
        eng.model.ops = triton_ops
        err_triton = (graph.float().cpu() - ref).abs().max().item()
        err_native = (dense.float().cpu() - ref).abs().max().item()
        tol = BF16_ERR_RATIO * err_native
        diff = (graph - dense).abs().max().item()
        agree = (graph.argmax(-1) == dense.argmax(-1)).float().mean().item()
        agree_ref = (graph.argmax(-1).cpu() == ref.argmax(-1)).float().mean().item()
        record(f"decode logits, bf16 {Path(model).name}: triton's error vs the float32 reference",
               round(err_triton, 4), err_triton <= tol,
               f"(tolerance {BF16_ERR_RATIO} x torch_native bf16's error {err_native:.4f} = {tol:.4f}; "
               f"triton vs torch_native {diff:.4f}, argmax agreement {agree:.2f}, with the reference {agree_ref:.2f})")
        # Sampler: captured graph vs eager, seeded.
        sps = [SamplingParams(temperature=0.7 + 0.1 * i, top_k=(50 if i % 2 else -1), top_p=(0.9 if i % 3 else 1.0),
                              min_p=0.05 * (i % 2), seed=100 + i) for i in range(8)]
        for r, sp in zip(reqs, sps):
            r.sampling, r.seed = sp, sp.seed
        tensors, variant = eng.sample_launcher.inputs(runner, reqs)
        runner.forward(batch)
        in_graph = runner.sample(graph, tensors, variant).tolist()
        eager_t = runner.sampler.sample(graph, type(tensors)(**{k: v.to(dev) for k, v in vars(tensors).items()
                                                                if v is not None}), variant).tolist()
        record("seeded sampling: sampler CUDA graph == eager", in_graph == eager_t, in_graph == eager_t)
        # Penalties + logit bias + a grammar mask: the captured penalties variant == eager.
        from tandem.engine import StructuredOutput

        for i, r in enumerate(reqs):
            r.sampling.frequency_penalty, r.sampling.presence_penalty = 0.5, 0.3
            r.sampling.repetition_penalty, r.sampling.logit_bias = 1.2, {5 + i: 30.0}
        reqs[0].grammar = eng.grammars.new_state(StructuredOutput("regex", "[0-9]+"))
        assert not eng.sample_launcher.take_penalty_rows(runner, reqs)
        tensors, variant = eng.sample_launcher.inputs(runner, reqs)
        runner.forward(batch)
        in_graph = runner.sample(graph, tensors, variant).tolist()
        eager_t = runner.sampler.sample(graph, type(tensors)(**{k: v.to(dev) for k, v in vars(tensors).items()
                                                                if v is not None}), variant).tolist()
        ok = in_graph == eager_t and variant.penalties and variant.masked
        record("penalties + logit bias + grammar mask: sampler CUDA graph == eager", ok, ok, str(variant))
        if eng.tokenizer is not None:  # the benchmark checkpoints are built without one
            digit = eng.tokenizer.decode([in_graph[0]]).isdigit()
            record("grammar row drew an allowed token ([0-9]+)", eng.tokenizer.decode([in_graph[0]]), digit)
        for r in reqs:
            eng.sample_launcher.free(runner, r.rid)
            r.grammar = None
    for r in reqs:
        eng.pool.free(r.pages)
    batch_invariance_checks(llm, g, "bfloat16")


def fp32_batch_invariance(dev: str, model: str) -> None:
    llm = LLM(model, device=dev, dtype="float32", max_total_tokens=1 << 16)
    batch_invariance_checks(llm, torch.Generator().manual_seed(3), "float32")


def batch_invariance_checks(llm, g: torch.Generator, dtype: str) -> None:
    """A seeded request (plain, and with penalties under CUDA graphs) alone and inside a batch of 13.

    The sampler is batch-invariant (Philox keyed by seed and position); the logits are too in
    float32, where the check must hold. In bf16 the default mode is not: GEMM and attention
    reductions change with the batch, so the tokens may differ. That is the expected result of the
    default mode, recorded with its outcome, not a failure (--enable-deterministic-inference is the
    mode that makes bf16 batch-invariant)."""
    vocab = llm.engine.model_config.vocab_size
    must_hold = dtype == "float32"
    expected = "" if must_hold else "(expected in bf16 without --enable-deterministic-inference: not batch-invariant)"
    sp = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    ids = [torch.randint(10, vocab, (20 + 3 * i,), generator=g).tolist() for i in range(13)]
    alone = llm.generate([ids[0]], sp)[0].token_ids
    batch_out = llm.generate(ids, [sp] + [SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)] * 12)
    same = alone == batch_out[0].token_ids
    record(f"seeded request, {dtype}: alone == in a batch of 13", same, same or not must_hold, expected)
    pen = SamplingParams(max_tokens=24, temperature=0.9, seed=43, frequency_penalty=1.0, repetition_penalty=1.3,
                         logit_bias={7: 5.0}, ignore_eos=True)
    alone = llm.generate([ids[1]], pen)[0].token_ids
    batch_out = llm.generate(ids, [sp, pen] + [SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)] * 11)
    same = alone == batch_out[1].token_ids
    record(f"penalized seeded request, {dtype}: alone == in a batch of 13 (CUDA graphs)", same,
           same or not must_hold, expected)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16-model", default=None, help="larger bf16 checkpoint for the logits check")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    git = git_info()
    command = command_line(argv)
    dev = "cuda"
    from deploy.demo_models import build_all

    build_all(str(REPO / "models"))
    steps = [lambda: kernel_checks(dev), lambda: model_checks(dev),
             lambda: logits_checks(dev, str(REPO / "models" / "tandem-demo-dense")),
             lambda: fp32_batch_invariance(dev, str(REPO / "models" / "tandem-demo-dense"))]
    if args.bf16_model:
        steps.append(lambda: logits_checks(dev, args.bf16_model))
    for step in steps:
        try:
            step()
        except Exception as exc:  # a crash is a failed check; the rest still run and the record is written
            record("check raised", f"{type(exc).__name__}: {exc}", False)
        free_device()
    failed = [c for c in checks if not c["ok"]]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    if args.out:
        write_json(Path(args.out), {"time": started, "command": command, "git": git,
                                    "machine": machine_info(), "checks": checks, "failed": len(failed)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
