"""Tensor parallelism in the benchmarks: the same requests through TP 1 and TP N in one run.

``compare_tp`` runs a one-rank engine and then a ``tp``-rank one (``tandem.engine.parallel``:
gloo on CPU, NCCL on CUDA with NVLink multicast off in every rank's environment), each on its own,
the first freed before the second loads: greedy and seeded tokens (with logprobs) of both, whole
``generate`` calls timed per batch size. Shared by ``engine_bench.py --tp-size`` and
``gpu_engine_check.py --tp-size``; tested on CPU (gloo) in tests/unit/test_bench_tp.py.
"""
from __future__ import annotations

import os

import torch
from tandem.config.schemas import EngineConfig
from tandem.engine import LLM, SamplingParams
from tandem.engine.parallel import MULTICAST_OFF, start_parallel

from benchmarks.common.engine import release_memory, run_tandem

# Float32: logprobs of TP N within this of TP 1's (a sharded sum is not bit-identical).
LOGPROB_TOL = 1e-4


def _outputs(llm: LLM, prompts: list, sps: list) -> list:
    llm.engine.flush_cache()
    return [(o.token_ids, o.logprobs) for o in (llm.generate([p], sp)[0] for p, sp in zip(prompts, sps))]


def _engine_settings(eng) -> dict:
    return {"overlap_schedule": eng.overlap_schedule, "cuda_graph_max_bs": eng.cuda_graph_max_bs,
            "kv_heads_per_rank": eng.pool.num_kv_heads, "num_pages": eng.pool.num_pages,
            "param_bytes_rank0": sum(p.numel() * p.element_size() for p in eng.model.parameters())}


def compare_tp(model: str, device: str, dtype: str, tp: int, prompts: list, max_tokens: int = 16,
               bench_prompts: dict | None = None, bench_out_len: int = 0, load_format: str = "auto",
               num_threads: int | None = None, **engine_kw) -> dict:
    """TP 1 then TP ``tp`` on the same requests: per side its tokens/logprobs, settings and tok/s per
    batch size of ``bench_prompts`` ({batch: [prompt ids]}); ``match``: tokens equal per request and the
    largest logprob difference."""
    if device.startswith("cuda"):
        os.environ.update(MULTICAST_OFF)
        if torch.cuda.device_count() < tp:
            raise SystemExit(f"--tp-size {tp} needs {tp} GPUs, torch sees {torch.cuda.device_count()}")
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True)
    seeded = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True, logprobs=True)
    sps = [greedy if i % 2 == 0 else seeded for i in range(len(prompts))]
    base = dict(device=device, dtype=dtype, load_format=load_format, **engine_kw)
    sides = {}
    for size in (1, tp):
        leader = None
        if size == 1:
            llm = LLM(model, **base)
        else:
            leader = start_parallel(EngineConfig(model_path=model, tp_size=size, **base), num_threads=num_threads)
            llm = LLM(engine=leader.engine)
        try:
            side = {"outputs": _outputs(llm, prompts, sps), "engine": _engine_settings(llm.engine), "tok_s": {}}
            for b, ps in (bench_prompts or {}).items():
                side["tok_s"][b] = run_tandem(llm, ps, bench_out_len, device)["tokens_per_s"]
                print(f"TP {size} batch {b:3d}: {side['tok_s'][b]:9.1f} tok/s", flush=True)
        finally:
            if leader is not None:
                leader.close()
        sides[size] = side
        del llm
        release_memory(device.startswith("cuda"))
    one, many = sides[1]["outputs"], sides[tp]["outputs"]
    same = [a[0] == b[0] for a, b in zip(one, many)]
    diff = max((abs(x - y) for a, b in zip(one, many) for x, y in zip(a[1], b[1])), default=0.0)
    return {"tp_size": tp, "sides": {str(k): {kk: vv for kk, vv in v.items() if kk != "outputs"}
                                      for k, v in sides.items()},
            "match": {"tokens_equal": sum(same), "requests": len(same), "max_logprob_diff": diff}}
