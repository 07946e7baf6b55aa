"""A small built-in load generator over the OpenAI streaming chat API (httpx + asyncio).

Used by profile_endpoint.py (one aiperf run costs ~17 s of fixed start-up on this 2-core
machine, too much for a many-point phase sweep) and by perf.py as the fallback when
aiperf cannot run. It measures what aiperf measures, with aiperf's definitions:
TTFT = first content chunk - request start; ITL = (latency - TTFT) / (OSL - 1);
per-user output tokens/s = (OSL - 1) / (latency - TTFT); throughputs over the measured
window (first request start to last request end). Prompts are synthetic with exactly
ISL tokens of the model's tokenizer, different per request (no prefix-cache hits), and
OSL is forced with max_tokens = min_tokens = OSL and ignore_eos.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

EXPORT_JSON = "profile_export_builtin.json"
RECORDS_JSONL = "profile_export_builtin.jsonl"


class PromptFactory:
    """Synthetic prompts of exactly `isl` tokens for the model's tokenizer (tokenizer.json)."""

    def __init__(self, tokenizer_dir: str | Path, seed: int = 100) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer {tokenizer_dir}: no tokenizer.json there")
        self.tok = Tokenizer.from_file(str(path))
        self.rng = random.Random(seed)
        vocab = self.tok.get_vocab()
        # Byte-level BPE pre-tokenizes on spaces, so space-prefixed alphabetic whole-word tokens
        # ("Ġword") concatenate into text that re-tokenizes to exactly the same ids.
        words = [t for t in vocab if t.startswith("\u0120") and t[1:].isalpha() and t[1:].isascii()]
        if len(words) < 100:
            words = [t for t in vocab if t.isprintable() and not t.startswith("<")]
        if len(words) < 100:
            raise ValueError(f"tokenizer {tokenizer_dir}: too few plain tokens to build prompts")
        self.words = sorted(words)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def make(self, isl: int) -> str:
        if isl < 1:
            raise ValueError(f"isl {isl}: must be >= 1")
        ids = [self.tok.token_to_id(self.rng.choice(self.words)) for _ in range(isl)]
        text = self.tok.decode(ids)
        # Decoding then re-encoding can merge or split tokens; trim/pad until exact.
        for _ in range(50):
            enc = self.tok.encode(text, add_special_tokens=False).ids
            if len(enc) == isl:
                return text
            if len(enc) > isl:
                text = self.tok.decode(enc[:isl])
            else:
                text = text + self.tok.decode([self.tok.token_to_id(self.rng.choice(self.words))])
        return text  # within a token or two of isl; count() reports the real length


@dataclass
class RequestRecord:
    start: float
    end: float = 0.0
    ttft_s: float | None = None
    output_tokens: int = 0
    input_tokens: int = 0
    chunks: int = 0
    error: str | None = None
    warmup: bool = False
    chunk_times: list[float] = field(default_factory=list, repr=False)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, isl: int, osl: int,
                       warmup: bool) -> RequestRecord:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": osl, "min_tokens": osl, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    rec = RequestRecord(start=time.perf_counter(), input_tokens=isl, warmup=warmup)
    usage_tokens = None
    try:
        async with client.stream("POST", f"{url.rstrip('/')}/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if chunk.get("usage"):
                    # prompt_tokens includes the chat template; ISL stays the content length, as in aiperf.
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if rec.ttft_s is None:
                            rec.ttft_s = now - rec.start
                        rec.chunk_times.append(now)
                        rec.chunks += 1
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.perf_counter()
    rec.output_tokens = usage_tokens if usage_tokens is not None else rec.chunks
    if rec.error is None and rec.ttft_s is None:
        rec.error = "no content chunk received"
    return rec


async def run_level(url: str, model: str, prompts: PromptFactory, *, isl: int, osl: int, concurrency: int,
                    request_count: int, warmup_count: int, timeout: float = 600.0) -> list[RequestRecord]:
    """Warmup requests, then `request_count` requests with at most `concurrency` in flight;
    the records of both (warmup ones flagged)."""
    if concurrency < 1 or request_count < 1 or warmup_count < 0:
        raise ValueError("need concurrency >= 1, request_count >= 1, warmup_count >= 0")
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        async def phase(n: int, warmup: bool) -> list[RequestRecord]:
            texts = [prompts.make(isl) for _ in range(n)]
            queue: asyncio.Queue[str] = asyncio.Queue()
            for t in texts:
                queue.put_nowait(t)
            out: list[RequestRecord] = []

            async def user() -> None:
                while not queue.empty():
                    out.append(await one_request(client, url, model, queue.get_nowait(), isl, osl, warmup))

            await asyncio.gather(*(user() for _ in range(min(concurrency, n))))
            return out

        warmup = await phase(warmup_count, True) if warmup_count else []
        return warmup + await phase(request_count, False)


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {"avg": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max())}


def summarize(all_records: list[RequestRecord]) -> dict:
    """Level metrics in the same normalized shape as aiperf.read_export(); the measured
    requests only, plus how many warmup requests failed."""
    records = [r for r in all_records if not r.warmup]
    ok = [r for r in records if r.error is None]
    failed = [r for r in records if r.error is not None]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error[:300]] = errors.get(r.error[:300], 0) + 1
    ttft = [r.ttft_s * 1e3 for r in ok]
    itl, per_user = [], []
    for r in ok:
        if r.output_tokens > 1:
            decode_s = (r.end - r.start) - r.ttft_s
            itl.append(decode_s * 1e3 / (r.output_tokens - 1))
            if decode_s > 0:
                per_user.append((r.output_tokens - 1) / decode_s)
    window = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    return {
        "client": "builtin",
        "ttft_ms": _stats(ttft),
        "itl_ms": _stats(itl),
        "request_latency_ms": _stats([(r.end - r.start) * 1e3 for r in ok]),
        "output_tps_per_user": _stats(per_user),
        "request_throughput": len(ok) / window if window > 0 else None,
        "output_token_throughput": out_tokens / window if window > 0 else None,
        "input_token_throughput": in_tokens / window if window > 0 else None,
        "isl_avg": in_tokens / len(ok) if ok else None,
        "osl_avg": out_tokens / len(ok) if ok else None,
        "benchmark_duration_s": window,
        "requests_ok": len(ok),
        "requests_failed": len(failed),
        "warmup_failed": sum(1 for r in all_records if r.warmup and r.error is not None),
        "errors": [{"count": c, "message": m} for m, c in errors.items()],
    }


def profile(url: str, model: str, tokenizer: str | Path, *, isl: int, osl: int, concurrency: int,
            request_count: int, warmup_count: int, artifact_dir: Path, seed: int = 100,
            prompts: PromptFactory | None = None) -> dict:
    """One level, written to artifact_dir (per-request JSONL + summary JSON); returns the summary."""
    prompts = prompts or PromptFactory(tokenizer, seed)
    records = asyncio.run(run_level(url, model, prompts, isl=isl, osl=osl, concurrency=concurrency,
                                    request_count=request_count, warmup_count=warmup_count))
    summary = summarize(records)
    summary["config"] = {"url": url, "model": model, "isl": isl, "osl": osl, "concurrency": concurrency,
                         "request_count": request_count, "warmup_count": warmup_count, "seed": seed}
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    t0 = min(r.start for r in records)
    with (artifact_dir / RECORDS_JSONL).open("w") as f:
        for r in records:
            d = asdict(r)
            d.pop("chunk_times")
            d["start"], d["end"] = r.start - t0, r.end - t0
            f.write(json.dumps(d) + "\n")
    (artifact_dir / EXPORT_JSON).write_text(json.dumps(summary, indent=2))
    return summary


def read_export(artifact_dir: Path) -> dict:
    return json.loads((Path(artifact_dir) / EXPORT_JSON).read_text())
