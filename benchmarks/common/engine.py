"""Helpers shared by the engine benchmarks (engine_bench.py, engine_prefill.py, engine_fp8.py):
device sync and timing, HBM read bandwidth, a timed generate call and one decode step's time.
Checkpoint shapes and random-weight builds are in benchmarks/common/shapes.py."""
from __future__ import annotations

import gc
import time

import torch
from tandem.engine import LLM, SamplingParams


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_bandwidth(device: str) -> float | None:
    """HBM read bytes/s: a sum over a 4 GiB buffer, best of 5 after a warm-up."""
    if not device.startswith("cuda"):
        return None
    buf = torch.ones(2 << 30, dtype=torch.bfloat16, device=device)
    buf.sum()
    sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    nbytes = buf.numel() * buf.element_size()
    del buf
    torch.cuda.empty_cache()
    return nbytes / best


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def release_memory(cuda: bool) -> None:
    """Give the memory of a model just deleted back before the next one loads."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run_tandem(llm: LLM, prompts: list, out_len: int, device: str, lora_name=None) -> dict:
    """Tokens/s of one ``generate`` of ``prompts`` (after an identical warm-up call); ``lora_name``:
    the LoRA adapter of every request, or a list with one per request."""
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)

    def call():
        llm.engine.flush_cache()  # every call prefills its prompts: no prefix-cache hits between calls
        return llm.generate(prompts, sp, lora_name=lora_name)

    call()  # identical warm-up call
    outs = []
    dt = timed(lambda: outs.append(call()), device)
    n = sum(len(o.token_ids) for o in outs[0])
    return {"seconds": dt, "output_tokens": n, "tokens_per_s": n / dt}


def decode_step_ms(llm: LLM, in_len: int, device: str, steps: int = 48, batch: int = 1) -> float:
    """Median wall-clock time of one engine step of a decode of ``batch`` requests (host work included)."""
    eng = llm.engine
    eng.flush_cache()
    g = torch.Generator().manual_seed(1)
    sp = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    rids = {eng.add_request(torch.randint(10, eng.model_config.vocab_size, (in_len,), generator=g).tolist(), sp)
            for _ in range(batch)}
    times = []
    while rids:
        sync(device)
        t0 = time.perf_counter()
        outs = eng.step()
        sync(device)
        if eng.stats().step_kind == "decode":
            times.append(time.perf_counter() - t0)
        rids -= {o.rid for o in outs if o.finished}
    times = sorted(times[2:])
    return times[len(times) // 2] * 1e3


def alternate_rounds(sides: dict, rounds: int) -> dict:
    """Run every side's measurement ``rounds`` times, the order rotating each round (side i first in
    round i), so a device that warms up or throttles over the run favours no side. ``sides``:
    {name: fn() -> float}; returns {name: [value per round]}."""
    names = list(sides)
    values = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            values[name].append(sides[name]())
    return values


def spread(values: list[float]) -> dict:
    """Median, min and max of a measurement's rounds (a gate is judged on the median)."""
    s = sorted(values)
    return {"median": s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2,
            "min": s[0], "max": s[-1], "rounds": len(s), "all": list(values)}


def round_ratios(num: list[float], den: list[float]) -> dict:
    """Per-round ratios num[i] / den[i] (both sides measured in the same round) and their spread."""
    return spread([a / b for a, b in zip(num, den)])
