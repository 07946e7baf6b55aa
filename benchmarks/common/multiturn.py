"""Multi-turn chat workload for PD (``perf.py --turns N``): what decode-side prefix reuse saves.

``chats`` conversations run side by side, turn by turn (every chat finishes turn k before any
starts turn k+1, so the workers' counters can be read between turns). Turn 1 of a chat is a
user message of ``isl`` tokens; turn k+1 sends the previous prompt, the model's answer (``osl``
tokens, greedy, ignore_eos) and a new user message of ``turn_isl`` tokens.

Per arm (a disaggregated stack with or without ``--disaggregation-decode-enable-radix-cache``),
from the workers' own counters, for turns >= 2 only (read after turn 1 and after the last turn):
``transferred_tokens`` (decode's ``tandem_pd_transferred_tokens_total``: prompt tokens whose KV a
prefill worker wrote), ``reused_tokens`` (``tandem_pd_decode_reused_tokens_total``: held by
decode's prefix cache, not transferred), ``prefill_computed_tokens`` (prefill workers'
``sglang:prompt_tokens_total - sglang:cached_tokens_total``) and the same difference on decode,
``decode_computed_tokens``, reported raw (decode's engine counts its local prefills' computed
tokens and, for remote prefills, the tokens whose KV prefill wrote); TTFT p50 of turn 1 and of
turns >= 2 (streaming).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx

from benchmarks.common import worker_metrics
from benchmarks.common.loadgen import PromptFactory

# Counters read on the workers' system ports (sums over label sets).
DECODE_COUNTERS = {"transferred": "tandem_pd_transferred_tokens_total",
                   "reused": "tandem_pd_decode_reused_tokens_total",
                   "prompt_tokens": "sglang:prompt_tokens_total", "cached_tokens": "sglang:cached_tokens_total"}
PREFILL_COUNTERS = {"prompt_tokens": "sglang:prompt_tokens_total", "cached_tokens": "sglang:cached_tokens_total"}


@dataclass
class TurnRecord:
    chat: int
    turn: int  # 1-based
    ttft_s: float | None
    prompt_tokens: int | None  # as the router counted them (chat template included)
    output_tokens: int
    answer: str
    error: str | None = None


async def chat_turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], osl: int,
                    chat: int, turn: int) -> TurnRecord:
    """One streamed turn; the answer's text comes back in the record (the next turn sends it)."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": osl, "min_tokens": osl,
            "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, parts, usage, error = None, [], {}, None
    try:
        async with client.stream("POST", f"{url.rstrip('/')}/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        parts.append(text)
    except Exception as e:  # noqa: BLE001 - recorded; the arm reports its failed turns
        error = f"{type(e).__name__}: {e}"
    return TurnRecord(chat, turn, ttft, usage.get("prompt_tokens"), usage.get("completion_tokens") or 0,
                      "".join(parts), error)


def _delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], key: str) -> int:
    return int(sum(after[w][key] - before[w][key] for w in after))


def _snapshot(decodes: dict[str, str], prefills: dict[str, str]) -> dict:
    return {"decode": {n: worker_metrics.scrape(a, DECODE_COUNTERS) for n, a in decodes.items()},
            "prefill": {n: worker_metrics.scrape(a, PREFILL_COUNTERS) for n, a in prefills.items()}}


async def run_chats(url: str, model: str, prompts: PromptFactory, *, chats: int, turns: int, isl: int,
                    turn_isl: int, osl: int, decodes: dict[str, str], prefills: dict[str, str],
                    timeout: float = 600.0) -> dict:
    """The workload on one stack; its turn records, counters for turns >= 2 and TTFTs."""
    firsts = [prompts.make(isl) for _ in range(chats)]
    follow_ups = [[prompts.make(turn_isl) for _ in range(turns - 1)] for _ in range(chats)]
    history = [[{"role": "user", "content": firsts[c]}] for c in range(chats)]
    records: list[TurnRecord] = []
    limits = httpx.Limits(max_connections=chats + 4, max_keepalive_connections=chats + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        after_first = None
        for k in range(1, turns + 1):
            if k > 1:
                for c in range(chats):
                    history[c] += [{"role": "assistant", "content": records[-chats + c].answer},
                                   {"role": "user", "content": follow_ups[c][k - 2]}]
            records += await asyncio.gather(*(chat_turn(client, url, model, history[c], osl, c, k)
                                              for c in range(chats)))
            if k == 1:
                after_first = await asyncio.to_thread(_snapshot, decodes, prefills)
        after = await asyncio.to_thread(_snapshot, decodes, prefills)
    d0, d1, p0, p1 = after_first["decode"], after["decode"], after_first["prefill"], after["prefill"]
    later = [r for r in records if r.turn > 1 and r.error is None and r.ttft_s is not None]
    first = [r for r in records if r.turn == 1 and r.error is None and r.ttft_s is not None]
    return {
        "turns_ok": sum(r.error is None for r in records), "turns_failed": sum(r.error is not None for r in records),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "transferred_tokens": _delta(d0, d1, "transferred"),
        "reused_tokens": _delta(d0, d1, "reused"),
        "prefill_computed_tokens": _delta(p0, p1, "prompt_tokens") - _delta(p0, p1, "cached_tokens"),
        "decode_computed_tokens": _delta(d0, d1, "prompt_tokens") - _delta(d0, d1, "cached_tokens"),
        "prompt_tokens_later_turns": sum(r.prompt_tokens or 0 for r in records if r.turn > 1),
        "ttft_first_turn_p50_ms": round(statistics.median(r.ttft_s for r in first) * 1e3, 2) if first else None,
        "ttft_later_turns_p50_ms": round(statistics.median(r.ttft_s for r in later) * 1e3, 2) if later else None,
        "answers": [r.answer for r in records],
    }
