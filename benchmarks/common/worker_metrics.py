"""Prefix-cache hits of a benchmark level, from the workers' own Prometheus counters.

Every worker exports SGLang's `sglang:prompt_tokens_total` and `sglang:cached_tokens_total`
on its system port (/metrics). Reading them on every worker before and after a level gives
the prompt tokens the level's prefills computed and how many of them were served from the
prefix cache instead (warmup requests included: the client sends them in the same run).
Only the workers that run prefills count: aggregated workers, and prefill workers in disagg.
"""
from __future__ import annotations

import urllib.request

COUNTERS = {"prompt_tokens": "sglang:prompt_tokens_total", "cached_tokens": "sglang:cached_tokens_total"}


def parse_counters(text: str, counters: dict[str, str] = COUNTERS) -> dict[str, float]:
    """Sum of every sample of each of ``counters`` ({key: metric name}; all label sets) in a
    Prometheus text page."""
    sums = dict.fromkeys(counters, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        for key, name in counters.items():
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                sums[key] += float(line.rsplit(None, 1)[-1])
    return sums


def scrape(system_address: str, counters: dict[str, str] = COUNTERS, timeout: float = 5.0) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{system_address}/metrics", timeout=timeout) as r:
        return parse_counters(r.read().decode(), counters)


def prefill_workers(specs, mode: str) -> dict[str, str]:
    """{name: system address} of the processes that run prefills in this stack."""
    kind = "prefill" if mode == "disagg" else "decode"
    return {s.name: s.system for s in specs if s.kind == kind and s.system}


def snapshot(workers: dict[str, str]) -> dict[str, dict[str, float]]:
    return {name: scrape(addr) for name, addr in workers.items()}


def cache_hits(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict:
    """Prompt and cached tokens between two snapshots, summed over the workers, and their ratio."""
    prompt = sum(after[w]["prompt_tokens"] - before[w]["prompt_tokens"] for w in after)
    cached = sum(after[w]["cached_tokens"] - before[w]["cached_tokens"] for w in after)
    return {"prompt_tokens": int(prompt), "cached_tokens": int(cached),
            "cache_hit_ratio": round(cached / prompt, 4) if prompt else None}
