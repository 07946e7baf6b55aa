"""GPU check of the custom all-reduce (tandem.engine.custom_all_reduce): N processes, CUDA IPC.

By default every rank runs on ONE GPU (cuda:0; CUDA IPC between processes on one device works),
so it runs on a single lent card; ``--spread`` puts rank r on cuda:(r % GPUs) instead, where
NCCL is timed beside it too (NCCL refuses two ranks on one GPU). Checks, each on every rank:

* eager, bf16 and float32, sizes from 8 values to the 512 KiB threshold (and one not a multiple of
  the kernel's block): the result == the float32 rank-order sum of every rank's input rounded once
  (bitwise: every rank regenerates every rank's input from its seed), within float tolerance of
  ``torch.stack(inputs).sum(0)``, and bitwise the same on every rank;
* captured in a CUDA graph: two all-reduces between other kernels (``a = 2x; ar(a); b = a + x;
  ar(b)``), the inputs copied into the registered buffer inside the graph, replayed 5 times on
  new inputs with the output poisoned (NaN) before each replay: == the reference every time;
  then eager calls after the replays (the flag counters stay in step);
* no barrier gave up (the status word of every rank) and a message over the threshold is refused
  by ``can_reduce`` (NCCL's).

Timing (no target): microseconds per all-reduce of a decode-sized message (bf16, 1 x 4096 and
64 x 4096), eager and in a graph of 20, against gloo (device -> host, gloo, host -> device) and,
with ``--spread`` over distinct GPUs, NCCL. On one GPU the ranks' kernels time-share the card:
those times measure context switches between processes, not the all-reduce.

    python benchmarks/custom_allreduce_check.py --out benchmarks/results/gpu/custom_allreduce_check_h100.json
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from benchmarks.common.results import command_line, git_info, machine_info, write_json  # noqa: E402

# (dtype, values): 8 values, one decode row of 4096, a size no multiple of the kernel's block, the 512 KiB threshold
SIZES = [(torch.bfloat16, 8), (torch.bfloat16, 4096), (torch.bfloat16, 5000), (torch.bfloat16, 64 * 4096),
         (torch.float32, 4096), (torch.float32, 128 * 1024)]
MAX_SPIN = 1 << 22  # polls before a barrier gives up (a few seconds): a hang becomes a failed check


def inputs(world: int, n: int, dtype, seed: int, device) -> list[torch.Tensor]:
    """Every rank's input of call ``seed`` (each rank regenerates all of them)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(n, generator=g, device=device).to(dtype) for _ in range(world)]


def rank_order(xs: list[torch.Tensor]) -> torch.Tensor:
    acc = xs[0].float().clone()
    for x in xs[1:]:
        acc += x.float()
    return acc.to(xs[0].dtype)


def rank_main(rank: int, world: int, port: int, spread: bool, out: str | None, meta: dict) -> None:
    import torch.distributed as dist
    from tandem.engine.custom_all_reduce import DEFAULT_MAX_BYTES, open_custom_all_reduce

    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(message)s")  # why it is off, if it is
    dev = torch.device("cuda", rank % torch.cuda.device_count() if spread else 0)
    torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    checks: list[dict] = []
    timings: dict = {}

    def record(name: str, value, ok: bool, detail: str = "") -> None:
        checks.append({"check": f"rank {rank}: {name}", "value": value, "ok": bool(ok), "detail": detail})

    try:
        ar = open_custom_all_reduce(rank, world, dev, dist.group.WORLD, enabled=True)
        record("opened over CUDA IPC", ar is not None, ar is not None)
        if ar is not None:
            ar.max_spin = MAX_SPIN
            eager_checks(ar, world, dev, record)
            graph_checks(ar, world, dev, record)
            record("no barrier gave up", not ar.failed(), not ar.failed())
            big = torch.zeros(DEFAULT_MAX_BYTES // 2 + 1, dtype=torch.bfloat16, device=dev)
            record("over the threshold: not taken (NCCL's)", not ar.can_reduce(big), not ar.can_reduce(big))
            timings = time_all(ar, world, dev, spread)
    except Exception as exc:  # a crash is a failed check; the record is still written
        record("raised", f"{type(exc).__name__}: {exc}", False, traceback.format_exc()[-2000:])
    gathered = [None] * world
    dist.gather_object((checks, timings), gathered if rank == 0 else None, dst=0)
    if rank == 0:
        all_checks = [c for cs, _ in gathered for c in cs]
        failed = [c for c in all_checks if not c["ok"]]
        for c in all_checks:
            print(f"[{'ok' if c['ok'] else 'FAIL'}] {c['check']}: {c['value']} {c['detail']}", flush=True)
        print(f"target: every check passes -> {len(all_checks) - len(failed)}/{len(all_checks)} "
              f"{'met' if not failed and all_checks else 'NOT met'}")
        for name, us in gathered[0][1].items():
            print(f"time {name}: {us}")
        if out:
            write_json(Path(out), {**meta, "world": world, "spread": spread,
                                   "devices": [str(torch.device('cuda', r % torch.cuda.device_count() if spread
                                                                else 0)) for r in range(world)],
                                   "checks": all_checks, "failed": len(failed), "timings_us": gathered[0][1],
                                   "timing_note": None if spread and torch.cuda.device_count() >= world else
                                   "all ranks on one GPU: the kernels time-share the card, the times measure "
                                   "context switches between processes, not the all-reduce"})
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and (not checks or any(not c["ok"] for cs, _ in gathered for c in cs)):
        sys.exit(1)


def eager_checks(ar, world: int, dev, record) -> None:
    for i, (dtype, n) in enumerate(SIZES):
        xs = inputs(world, n, dtype, seed=100 + i, device=dev)
        got = ar.all_reduce(xs[ar.rank].clone())
        torch.cuda.synchronize()
        want = rank_order(xs)
        same = torch.equal(got, want)
        total = torch.stack([x.double() for x in xs]).sum(0)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        close = torch.allclose(got.double(), total, rtol=tol, atol=tol)
        record(f"eager {str(dtype)[6:]} x {n}: == rank-order sum (bitwise), ~ torch sum", [same, close], same and close,
               f"max |got - torch sum| {float((got.double() - total).abs().max()):.3g}")
        digest = hashlib.sha256(got.cpu().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, digest)
        record(f"eager {str(dtype)[6:]} x {n}: same on every rank", everyone, all(e == everyone[0] for e in everyone))


def graph_checks(ar, world: int, dev, record) -> None:
    n, dtype = 8 * 4096, torch.bfloat16
    x = torch.zeros(n, dtype=dtype, device=dev)

    def body():
        a = x * 2
        ar.all_reduce(a)
        b = a + x
        ar.all_reduce(b)
        return b

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    ok = []
    for seed in range(5):
        xs = inputs(world, n, dtype, seed=200 + seed, device=dev)
        x.copy_(xs[ar.rank])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        a = rank_order([v * 2 for v in xs])
        want = rank_order([a + v for v in xs])
        ok.append(torch.equal(out, want))
    record("graph of two all-reduces, 5 replays on new inputs == reference (bitwise)", ok, all(ok))
    xs = inputs(world, 4096, dtype, seed=300, device=dev)
    got = ar.all_reduce(xs[ar.rank].clone())
    torch.cuda.synchronize()
    record("eager after the replays == reference", torch.equal(got, rank_order(xs)), torch.equal(got, rank_order(xs)))


def time_all(ar, world: int, dev, spread: bool) -> dict:
    import torch.distributed as dist

    distinct = spread and torch.cuda.device_count() >= world
    nccl = dist.new_group(backend="nccl") if distinct else None
    out = {}
    for rows in (1, 64):
        out.update(_time_size(ar, torch.randn(rows * 4096, device=dev).to(torch.bfloat16), f"bf16 {rows}x4096", nccl))
    return out


def _time_size(ar, t: torch.Tensor, what: str, nccl) -> dict:
    import torch.distributed as dist

    def gloo():
        h = t.cpu()
        dist.all_reduce(h)
        t.copy_(h)

    out = {f"custom eager {what}": _time(lambda: ar.all_reduce(t), 20),
           f"custom graph {what}": _time_graph(lambda: ar.all_reduce(t), 20),
           f"gloo (via host) {what}": _time(gloo, 20)}
    if nccl is not None:
        out[f"nccl eager {what}"] = _time(lambda: dist.all_reduce(t, group=nccl), 20)
        out[f"nccl graph {what}"] = _time_graph(lambda: dist.all_reduce(t, group=nccl), 20)
    return out


def _time(fn, iters: int) -> float:
    """Microseconds per call, the median of 3 rounds."""
    import torch.distributed as dist

    fn()
    rounds = []
    for _ in range(3):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / iters * 1e6)
    return round(sorted(rounds)[1], 2)


def _time_graph(fn, per_graph: int) -> float:
    """Microseconds per call replaying a graph of ``per_graph`` calls, median of 3 rounds of 5 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    return round(_time(graph.replay, 5) / per_graph, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2, help="ranks (processes); default 2")
    ap.add_argument("--spread", action="store_true", help="rank r on cuda:(r %% GPUs) (default: all on cuda:0)")
    ap.add_argument("--out", default=None, help="results JSON")
    ap.add_argument("--timeout", type=float, default=100.0, help="seconds before the ranks are killed")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command_line(argv), "git": git_info(),
            "machine": machine_info()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, args.world, port, args.spread, args.out, meta))
             for r in range(args.world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args.timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    if hung:
        print(f"FAIL: ranks {hung} did not finish in {args.timeout:.0f} s (killed)")
    codes = [p.exitcode for p in procs]
    print(f"exit codes {codes}")
    return 0 if not hung and all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    # NVLink multicast stays off (as tandem.engine.parallel.MULTICAST_OFF); the ranks inherit it
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    sys.exit(main())
