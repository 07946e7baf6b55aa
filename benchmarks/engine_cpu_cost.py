"""CPU seconds the engine spends per generated token (this process's user + system time, one
torch thread), for A/B comparisons on a busy shared machine: wall-clock tokens/s there says
more about the neighbours' load than about the code, CPU time much less so.

It imports ``tandem.engine`` from whatever PYTHONPATH gives (it never edits sys.path), so
``benchmarks/ab_alternate.py`` can run this one file against two trees:

    python benchmarks/ab_alternate.py --base-dir /tmp/base --rounds 5 \\
        --metric batch16.cpu_ms_per_token:lower --metric batch1.cpu_ms_per_token:lower \\
        -- python $PWD/benchmarks/engine_cpu_cost.py --model $PWD/models/tandem-demo-dense

Prints one JSON line: per batch size, CPU ms per token and wall tokens/s of one ``generate``
(random prompts of --input-len tokens, greedy, --output-len tokens each, after a warm-up call).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from tandem.engine import LLM, SamplingParams


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (e.g. models/tandem-demo-dense)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    llm = LLM(a.model, device="cpu", dtype="float32")
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    llm.generate([torch.randint(10, vocab, (a.input_len,), generator=g).tolist()],
                 SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    result = {}
    for b in a.batch_sizes:
        prompts = [torch.randint(10, vocab, (a.input_len,), generator=g).tolist() for _ in range(b)]
        c0, t0 = cpu_seconds(), time.perf_counter()
        outs = llm.generate(prompts, sp)
        c1, t1 = cpu_seconds(), time.perf_counter()
        n = sum(len(o.token_ids) for o in outs)
        result[f"batch{b}"] = {"tokens": n, "cpu_ms_per_token": (c1 - c0) * 1e3 / n, "wall_tok_s": n / (t1 - t0)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
