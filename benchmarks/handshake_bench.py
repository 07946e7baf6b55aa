"""Per-request PD handshake overhead through the real Prefill service.

A decode-side client (a real KV receiver, registered with RegisterDecode) runs the whole
handshake against a real `tandem.prefill` process as decode does (a ``grpc.aio`` stream, as
decode's remote-prefill loop opens: start and allocation written back to back, then the
prefill's messages read and handed to the receiver): start + allocation
(decode's room) -> room -> KV + aux -> done, for a 1-token prompt (one page). The prefill's own compute time (reported
in TransferDone.prefill_ms) is subtracted, leaving the protocol overhead: gRPC stream,
room bookkeeping, allocation checks, transfer of one page and the aux row.

With ``--baseline-source DIR`` (a checkout of another commit) a second prefill process runs that
tree's code and the rooms alternate between the two in every round (``--rounds``, the backends
alternating too): the change and its baseline are measured like for like; medians of the rounds.

    .venv/bin/python benchmarks/handshake_bench.py [--backend nixl grpc] [--n 300] [--rounds 3] [--baseline-source DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tandem.transfer import KvBuffers, KVPoll, TransferDone, TransferFailure, make_receiver, new_room_id  # noqa: E402
from tandem.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc  # noqa: E402
from tandem.worker.pd_proto import message_from_proto, registration_to_request  # noqa: E402
from tandem.worker.process import model_fingerprint  # noqa: E402

from benchmarks.common.baseline import git_commit, source_path  # noqa: E402
from benchmarks.common.results import print_targets, provenance, target, write_json  # noqa: E402
from tests.support.procs import start_service  # noqa: E402


def buffers(model: Path, pages: int = 64) -> KvBuffers:
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    shape = (pages, 16, heads, dim)
    n = cfg["num_hidden_layers"]
    return KvBuffers([torch.zeros(shape) for _ in range(n)], [torch.zeros(shape) for _ in range(n)],
                     torch.zeros((64, 64), dtype=torch.uint8))


async def one(stub, rx, decode_id: str, slot: int) -> tuple[float, float]:
    room = new_room_id()
    t0 = time.perf_counter()
    rx.expect(room, [slot], slot)
    call = stub.Prefill(timeout=30)
    await call.write(prefill_pb2.PrefillClientMessage(start=prefill_pb2.PrefillStart(
        request_id="hs", decode_id=decode_id, input_ids=[42], room=room,
        sampling=common_pb2.SamplingParams(max_tokens=1))))
    # As decode does: the allocation goes right after the start.
    await call.write(prefill_pb2.PrefillClientMessage(allocation=prefill_pb2.PageAllocation(
        room=room, page_indices=[slot], aux_slot=slot)))
    assert (await call.read()).room.room == room
    done = None
    while (msg := await call.read()) is not grpc.aio.EOF:
        lib_msg = message_from_proto(msg)
        rx.handle(lib_msg)
        if isinstance(lib_msg, TransferFailure):
            raise RuntimeError(f"room {room} failed: {lib_msg}")
        if isinstance(lib_msg, TransferDone):
            done = msg.done
            break
    if done is None:
        raise RuntimeError(f"room {room}: the Prefill stream ended without TransferDone")
    while (state := rx.poll(room)) is not KVPoll.Success:
        if state is KVPoll.Failed:
            raise RuntimeError(f"room {room} failed on the receiver: {rx.failure(room)}")
        await asyncio.sleep(0.0001)
    total = time.perf_counter() - t0
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:  # the stream's end, outside the timed part
        pass
    rx.forget(room)
    return total, done.prefill_ms / 1e3


async def run_rooms(addresses: dict[str, str], rx, n: int, warmup: int = 20) -> dict[str, tuple[list, list]]:
    """``n`` rooms on each prefill worker of ``addresses`` ({label: address}), alternating."""
    async with contextlib.AsyncExitStack() as stack:
        stubs = {}
        for label, address in addresses.items():
            ch = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            stubs[label] = prefill_pb2_grpc.PrefillStub(ch)
            await stubs[label].RegisterDecode(registration_to_request(rx.registration(), "bench-decode"))
            for i in range(warmup):  # warm the stream and the engine
                await one(stubs[label], rx, "bench-decode", i % 64)
        out = {label: ([], []) for label in addresses}
        order = list(addresses)
        for i in range(n):
            for label in (order if i % 2 == 0 else order[::-1]):
                total, compute = await one(stubs[label], rx, "bench-decode", i % 64)
                out[label][0].append(total)
                out[label][1].append(total - compute)
    return out


def measure(model: Path, backend: str, n: int, baseline_source: str | None = None) -> dict:
    """One round on ``backend``: this tree's prefill (and the baseline's) with one receiver."""
    flags = ("--model-path", str(model), "--max-total-tokens", "4096", "--disaggregation-transfer-backend", backend)
    procs = {}
    try:
        procs["this"] = start_service("tandem.prefill", *flags)
        if baseline_source:
            procs["baseline"] = start_service("tandem.prefill", *flags,
                                              env={"PYTHONPATH": source_path(baseline_source)})
        rx = make_receiver(backend, buffers(model), name="bench-decode",
                           model_fingerprint=model_fingerprint(str(model), torch.float32))
        runs = asyncio.run(run_rooms({k: p.grpc_address for k, p in procs.items()}, rx, n))
    finally:
        for p in procs.values():
            p.stop()
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1e3  # noqa: E731
    result = {"backend": backend, "n": n, "load_avg_1m": round(os.getloadavg()[0], 2)}
    for label, (totals, overheads) in runs.items():
        key = "" if label == "this" else "baseline_"
        result[f"{key}total_ms"] = {"p50": q(totals, 50), "p99": q(totals, 99)}
        result[f"{key}overhead_ms"] = {"p50": q(overheads, 50), "p99": q(overheads, 99)}
        print(f"handshake through the real Prefill service ({backend}, 1 page, n={n}, {label})")
        print(f"  total incl. 1-token prefill   p50 {q(totals, 50):.2f} ms   p99 {q(totals, 99):.2f} ms")
        print(f"  overhead (total - compute)    p50 {q(overheads, 50):.2f} ms   p99 {q(overheads, 99):.2f} ms   "
              "(goal p50 <= 2 ms)")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models/tandem-demo-dense"))
    ap.add_argument("--backend", nargs="+", choices=["nixl", "grpc"], default=["nixl", "grpc"],
                    help="transfer backends, measured one after the other in each round")
    ap.add_argument("--n", type=int, default=300, help="timed rooms per round, backend and prefill worker")
    ap.add_argument("--rounds", type=int, default=1, help="rounds (backends in alternating order); medians reported")
    ap.add_argument("--baseline-source", default=None,
                    help="a tandem checkout (another commit) whose prefill worker serves rooms in the same rounds")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/handshake_bench.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.n < 2:
        raise SystemExit("--rounds must be >= 1 and --n >= 2")
    result = {**provenance(argv), "args": vars(args)}
    if args.baseline_source:
        result["baseline"] = {"source": args.baseline_source, "commit": git_commit(args.baseline_source)}
    rounds = []
    for r in range(args.rounds):
        order = args.backend if r % 2 == 0 else args.backend[::-1]
        rounds.append({b: measure(Path(args.model), b, args.n, args.baseline_source) for b in order})
    result["rounds"] = rounds
    for b in args.backend:
        result[b] = {"backend": b, "n": args.n, "rounds": args.rounds}
        for key in ("overhead_ms", "total_ms", "baseline_overhead_ms", "baseline_total_ms"):
            if key in rounds[0][b]:
                result[b][key] = {"p50": statistics.median(rd[b][key]["p50"] for rd in rounds),
                                  "p99": statistics.median(rd[b][key]["p99"] for rd in rounds)}
        print(f"{b}: overhead p50 {result[b]['overhead_ms']['p50']:.2f} ms (median of {args.rounds} rounds)" +
              (f", baseline {result[b]['baseline_overhead_ms']['p50']:.2f} ms" if "baseline_overhead_ms" in result[b]
               else ""))
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["targets"] = [target(f"PD handshake overhead p50, {b}, 1 page (ms)", round(result[b]["overhead_ms"]["p50"], 3),
                                "<= 2", result[b]["overhead_ms"]["p50"] <= 2.0) for b in args.backend]
    print_targets(result["targets"])
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
