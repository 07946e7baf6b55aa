"""KV transfer benchmark: NIXL vs local memcpy, the grpc backend, handshake latency.

One run, two processes on this machine (a "decode" process owning the destination pool
and a "prefill" process owning the source pool):

1. NIXL WRITE of N pages (all layers, K and V) from prefill's pool into decode's pool,
   sizes up to >= 256 MiB, contiguous and random page maps, timed from the send until
   the decode receiver sees Success; vs a local ``torch`` copy of the same bytes.
2. The grpc backend on the same pages: pack into KvChunk messages, a real Prefill bidi
   stream over loopback (RegisterDecode + start/room/allocation/chunks/done), unpack
   into decode's pages.
3. Per-request handshake overhead with an empty transfer, p50/p99:
   a) gRPC Prefill stream (start -> room -> allocation -> empty chunk + done),
   b) NIXL aux-only write: send -> decode receiver Success (one way, shared monotonic
      clock),
   c) a) with the done row written by NIXL instead (the nixl protocol minus the engine).
   The full-service figure (the real Prefill service with an engine) comes with the
   service; the servicer here is a minimal one built on the same library.

Usage: python benchmarks/transfer_bench.py [--sizes 16 64 256] [--repeats 5]
Writes benchmarks/results/transfer_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common.results import print_targets, provenance, target, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MiB = 1 << 20

# A Llama-ish slice: 8 layers, 8 KV heads x 128, bf16, 16-token pages = 32 KiB per page and
# layer, 512 KiB per page over all layers (K and V).
GEOM = dict(num_layers=8, page_size=16, kv_heads=8, head_dim=128, dtype=torch.bfloat16)


def make_pool(num_pages: int, seed: int | None):
    from tandem.transfer import KvBuffers

    g = GEOM
    shape = (num_pages, g["page_size"], g["kv_heads"], g["head_dim"])
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def t():
        if gen is None:
            return torch.zeros(shape, dtype=g["dtype"])
        return torch.randint(-1000, 1000, shape, generator=gen).to(g["dtype"])

    return KvBuffers([t() for _ in range(g["num_layers"])], [t() for _ in range(g["num_layers"])],
                     torch.zeros(4096, 64, dtype=torch.uint8))


def page_total_bytes(n_pages: int) -> int:
    g = GEOM
    bpp = g["page_size"] * g["kv_heads"] * g["head_dim"] * torch.tensor([], dtype=g["dtype"]).element_size()
    return n_pages * bpp * 2 * g["num_layers"]


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


# --------------------------------------------------------------------------------------
# Decode process: NIXL receiver + gRPC client side of the handshake benches.
# --------------------------------------------------------------------------------------
def decode_main(conn, num_pages: int, progress_thread: bool = False):
    from tandem.transfer import KVPoll, TransferDone
    from tandem.transfer.nixl_backend import NixlKvReceiver

    pool = make_pool(num_pages, None)
    rx = NixlKvReceiver(pool, "bench-decode", transfer_timeout_s=None,
                        progress_thread=progress_thread)
    conn.send(rx.registration())
    while (msg := conn.recv()) is not None:
        room, dst, slot = msg
        rx.expect(room, dst, slot)
        # The sender's TransferDone (one chunk) would follow the data on the control stream;
        # applied up front, Success marks the moment the pages and the aux row have landed.
        rx.handle(TransferDone(room, 1))
        conn.send("ready")
        while (s := rx.poll(room)) not in (KVPoll.Success, KVPoll.Failed):
            time.sleep(0.00005)
        t_done = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        failure = rx.failure(room)
        conn.send((int(s), t_done, failure.message if failure else ""))
        rx.forget(room)
    rx.close()


# --------------------------------------------------------------------------------------
# Prefill process for the gRPC parts: a minimal Prefill servicer on the real stubs.
# --------------------------------------------------------------------------------------
def prefill_server_main(conn, num_pages: int):
    import grpc
    from tandem.transfer import AuxRow, FailureReason, TransferFailure, new_room_id
    from tandem.transfer.grpc_backend import GrpcKvSender
    from tandem.transfer.nixl_backend import NixlKvSender
    from tandem.v1 import prefill_pb2, prefill_pb2_grpc
    from tandem.worker.pd_proto import layout_to_proto, message_to_proto, registration_from_request

    pool = make_pool(num_pages, seed=1)
    senders = {"grpc": GrpcKvSender(pool, "bench-prefill-grpc"),
               "nixl": NixlKvSender(pool, "bench-prefill-nixl")}
    peers: dict[str, tuple[str, str]] = {}  # decode_id -> (backend, peer)

    class Servicer(prefill_pb2_grpc.PrefillServicer):
        def RegisterDecode(self, req, ctx):
            tx = senders[req.transfer_backend]
            peers[req.decode_id] = (req.transfer_backend, tx.add_peer(registration_from_request(req)))
            return prefill_pb2.RegisterDecodeResponse(prefill_id="bench", layout=layout_to_proto(tx.layout),
                                                      agent_name=tx.name)

        def Prefill(self, it, ctx):
            start = next(it).start
            backend, peer = peers[start.decode_id]
            tx = senders[backend]
            room = start.room or new_room_id()
            n = len(start.input_ids)  # here: number of pages to send
            alloc = next(it).allocation
            yield prefill_pb2.PrefillServerMessage(
                room=prefill_pb2.BootstrapRoom(room=room, num_pages=n, prefill_id="bench"))
            src = np.arange(n, dtype=np.int64)
            row = AuxRow.one(room, 42, -0.5, 0)
            h = [tx.send_kv(room, peer, src, np.asarray(alloc.page_indices), 0, True),
                 tx.send_aux(room, peer, alloc.aux_slot, row)]
            for x in h:
                for m in x.messages:
                    yield message_to_proto(m)
            st = tx.wait(h, 60)
            tx.release(h)
            if not st.done:
                yield message_to_proto(TransferFailure(room, FailureReason.BACKEND_ERROR, st.reason))
                return
            yield message_to_proto(tx.done(room, h))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prefill_pb2_grpc.add_PrefillServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    conn.recv()  # stop
    server.stop(0)
    for tx in senders.values():
        tx.close()


# --------------------------------------------------------------------------------------
# Benches (run in the main process, which plays prefill for NIXL and decode for gRPC).
# --------------------------------------------------------------------------------------
def bench_memcpy(src: torch.Tensor, dst: torch.Tensor, copies: int = 3, threads: int | None = None) -> float:
    """Median seconds of a local torch copy src -> dst (with ``threads`` intra-op threads: a
    single-threaded copy is what one process's kernel copy, UCX's cma, competes with)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ts = []
        for _ in range(copies):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    finally:
        torch.set_num_threads(saved)


def bench_nixl(tx, peer, conn, n_pages, dec_pages, mapping, repeats, rng, first_round: int = 0) -> dict:
    from tandem.transfer import AuxRow

    ts, sender_ts = [], []
    for r in range(first_round, first_round + repeats):
        src = np.arange(n_pages)
        if mapping == "contiguous":
            dst = np.arange(n_pages) + (r % 2) * n_pages
        else:
            src = rng.permutation(tx.buffers.num_pages)[:n_pages]
            dst = rng.permutation(dec_pages)[:n_pages]
        room = 10_000 + r + n_pages * 1000
        conn.send((room, dst.tolist(), 0))
        assert conn.recv() == "ready"
        t0 = time.perf_counter()
        h = [tx.send_kv(room, peer, src, dst, 0, True), tx.send_aux(room, peer, 0, AuxRow.one(room, 1))]
        st = tx.wait(h, 120, sleep_s=0.00005)
        t1 = time.perf_counter()
        tx.release(h)
        state, t_done, reason = conn.recv()
        if not st.done or state != 4:
            raise RuntimeError(f"nixl transfer failed: {st.reason or reason}")
        ts.append(t_done - t0)
        sender_ts.append(t1 - t0)
    return {"median_s": statistics.median(ts), "best_s": min(ts),
            "sender_median_s": statistics.median(sender_ts)}


def _stream(stub, msgs_q):
    return stub.Prefill(iter(msgs_q.get, None))


def grpc_request(stub, rx, decode_id, n_pages, dst, slot=0) -> tuple[float, int]:
    """One Prefill stream, as decode runs it; returns (seconds, final KVPoll)."""
    from tandem.transfer import KVPoll, TransferDone, TransferFailure, new_room_id
    from tandem.v1 import prefill_pb2
    from tandem.worker.pd_proto import message_from_proto

    q: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    room = new_room_id()
    rx.expect(room, dst, slot)
    q.put(prefill_pb2.PrefillClientMessage(
        start=prefill_pb2.PrefillStart(request_id="b", decode_id=decode_id, input_ids=range(n_pages), room=room)))
    q.put(prefill_pb2.PrefillClientMessage(
        allocation=prefill_pb2.PageAllocation(room=room, page_indices=dst, aux_slot=slot)))
    responses = _stream(stub, q)
    assert next(responses).room.room == room
    state = None
    for msg in responses:
        lib_msg = message_from_proto(msg)
        rx.handle(lib_msg)
        if isinstance(lib_msg, (TransferDone, TransferFailure)):
            break
    q.put(None)
    while (state := rx.poll(room)) not in (KVPoll.Success, KVPoll.Failed):
        time.sleep(0.00005)
    dt = time.perf_counter() - t0
    rx.forget(room)
    return dt, state


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[4, 16, 64, 256],
                    help="transfer sizes in MiB (all layers, K+V)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--handshakes", type=int, default=300)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--progress-thread", action="store_true",
                    help="use NIXL's own (busy-polling) progress thread for the nixl part")
    args = ap.parse_args(argv)
    started = provenance(argv)

    import grpc
    from tandem.transfer import AuxRow, KVPoll
    from tandem.transfer.grpc_backend import GrpcKvReceiver
    from tandem.transfer.nixl_backend import NixlKvReceiver, NixlKvSender
    from tandem.v1 import prefill_pb2_grpc
    from tandem.worker.pd_proto import registration_to_request

    load_start = os.getloadavg()
    per_page = page_total_bytes(1)
    pages = [max(1, int(s * MiB) // per_page) for s in args.sizes]
    src_pool_pages = max(pages) + 16
    dec_pool_pages = 2 * max(pages) + 16
    ctx = mp.get_context("spawn")
    rng = np.random.default_rng(0)
    results: dict = {**started, "args": {k: str(v) for k, v in vars(args).items()},
                     "nixl_progress_thread": args.progress_thread, "geometry": {k: str(v) for k, v in GEOM.items()},
                     "bytes_per_page_all_layers": per_page, "transfer": [], "handshake": {}}

    # ---- NIXL vs memcpy ---------------------------------------------------------------
    dconn, child = ctx.Pipe()
    dproc = ctx.Process(target=decode_main, args=(child, dec_pool_pages, args.progress_thread),
                        daemon=True)
    dproc.start()
    registration = dconn.recv()
    tx = NixlKvSender(make_pool(src_pool_pages, seed=1), "bench-prefill",
                      progress_thread=args.progress_thread)
    peer = tx.add_peer(registration)
    bench_nixl(tx, peer, dconn, 4, dec_pool_pages, "contiguous", 2, rng)  # warm the connection
    for n in pages:
        nbytes = n * per_page
        reps = args.repeats if nbytes <= 64 * MiB else max(3, args.repeats // 2)
        src_buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        dst_buf = torch.empty_like(src_buf)
        dst_buf.copy_(src_buf)  # touch pages
        # Alternating rounds (memcpy, 1-thread memcpy, nixl contiguous, nixl random), so that both
        # sides of every ratio meet the same load on a shared machine; per-round ratios show the noise.
        rounds: dict[str, list] = {"memcpy": [], "memcpy1": [], "contiguous": [], "random": []}
        for i in range(reps):
            rounds["memcpy"].append(bench_memcpy(src_buf, dst_buf))
            rounds["memcpy1"].append(bench_memcpy(src_buf, dst_buf, threads=1))
            for mapping in ("contiguous", "random"):
                rounds[mapping].append(bench_nixl(tx, peer, dconn, n, dec_pool_pages, mapping, 1, rng, first_round=i))
        del src_buf, dst_buf
        mem, mem1 = statistics.median(rounds["memcpy"]), statistics.median(rounds["memcpy1"])
        for mapping in ("contiguous", "random"):
            secs = [x["median_s"] for x in rounds[mapping]]
            r = {"median_s": statistics.median(secs),
                 "sender_median_s": statistics.median(x["sender_median_s"] for x in rounds[mapping])}
            per_round = [m / t for m, t in zip(rounds["memcpy"], secs, strict=True)]
            results["transfer"].append({
                "backend": "nixl", "mapping": mapping, "pages": n, "bytes": nbytes, "rounds": reps,
                "seconds": r["median_s"], "sender_seconds": r["sender_median_s"],
                "gbps": nbytes / r["median_s"] / 1e9, "memcpy_seconds": mem,
                "memcpy_gbps": nbytes / mem / 1e9, "ratio_vs_memcpy": mem / r["median_s"],
                "ratio_vs_memcpy_per_round": [round(x, 3) for x in per_round],
                "memcpy_1thread_gbps": nbytes / mem1 / 1e9, "ratio_vs_memcpy_1thread": mem1 / r["median_s"],
            })
            print(f"nixl {mapping:10s} {nbytes / MiB:7.1f} MiB  {nbytes / r['median_s'] / 1e9:6.2f} GB/s"
                  f"  memcpy {nbytes / mem / 1e9:6.2f} GB/s  ratio {mem / r['median_s']:.2f}", flush=True)

    # NIXL aux-only one-way latency (empty transfer: notification + 64-byte row).
    lat = []
    for i in range(args.handshakes):
        room = 5_000_000 + i
        dconn.send((room, [], i % 64))
        assert dconn.recv() == "ready"
        t0 = time.perf_counter()
        h = [tx.send_kv(room, peer, [], [], 0, True),
             tx.send_aux(room, peer, i % 64, AuxRow.one(room, 1))]
        st = tx.wait(h, 10, sleep_s=0.00005)
        tx.release(h)
        state, t_done, reason = dconn.recv()
        assert st.done and state == 4, reason
        lat.append(t_done - t0)
    results["handshake"]["nixl_aux_only_one_way"] = {
        "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "n": len(lat)}
    dconn.send(None)
    dproc.join(10)
    tx.close()

    # ---- gRPC backend and gRPC handshakes ------------------------------------------------
    sconn, child = ctx.Pipe()
    sproc = ctx.Process(target=prefill_server_main, args=(child, src_pool_pages), daemon=True)
    sproc.start()
    port = sconn.recv()
    chan = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = prefill_pb2_grpc.PrefillStub(chan)
    dec_pool = make_pool(dec_pool_pages, None)
    grx = GrpcKvReceiver(dec_pool, "bench-decode-grpc", transfer_timeout_s=None)
    stub.RegisterDecode(registration_to_request(grx.registration(), "d-grpc"))
    nrx = NixlKvReceiver(make_pool(16, None), "bench-decode-nixl2", transfer_timeout_s=None)
    stub.RegisterDecode(registration_to_request(nrx.registration(), "d-nixl"))

    grpc_request(stub, grx, "d-grpc", 4, list(range(4)))  # warm up
    for n in pages:
        nbytes = n * per_page
        reps = args.repeats if nbytes <= 64 * MiB else max(3, args.repeats // 2)
        ts = []
        for _ in range(reps):
            dst = rng.permutation(dec_pool_pages)[:n].tolist()
            dt, state = grpc_request(stub, grx, "d-grpc", n, dst)
            assert state is KVPoll.Success
            ts.append(dt)
        mem = next(r["memcpy_seconds"] for r in results["transfer"] if r["pages"] == n)
        med = statistics.median(ts)
        results["transfer"].append({
            "backend": "grpc", "mapping": "random", "pages": n, "bytes": nbytes,
            "seconds": med, "gbps": nbytes / med / 1e9, "memcpy_seconds": mem,
            "memcpy_gbps": nbytes / mem / 1e9, "ratio_vs_memcpy": mem / med})
        print(f"grpc random     {nbytes / MiB:7.1f} MiB  {nbytes / med / 1e9:6.2f} GB/s"
              f"  memcpy {nbytes / mem / 1e9:6.2f} GB/s  ratio {mem / med:.2f}", flush=True)

    for name, rx, did in (("grpc_stream_empty_transfer", grx, "d-grpc"),
                          ("grpc_stream_plus_nixl_aux", nrx, "d-nixl")):
        for _ in range(20):
            grpc_request(stub, rx, did, 0, [])
        lat = []
        for _ in range(args.handshakes):
            dt, state = grpc_request(stub, rx, did, 0, [])
            assert state is KVPoll.Success
            lat.append(dt)
        results["handshake"][name] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                                      "n": len(lat)}
    sconn.send("stop")
    sproc.join(10)
    chan.close()
    nrx.close()

    results["setup"] = {"note": "CPU only, host memory (DRAM), both processes on one host",
                        "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
                        "torch_threads": torch.get_num_threads(),
                        "loadavg_start": " ".join(f"{x:.1f}" for x in load_start),
                        "loadavg_end": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    results["targets"] = targets_of(results)
    write_results(results, args.out)
    print_targets(results["targets"])


def targets_of(res: dict) -> list[dict]:
    """NIXL at the largest size (contiguous pages) >= 0.5x a local memcpy of the same bytes."""
    rows = [r for r in res["transfer"] if r["backend"] == "nixl" and r["mapping"] == "contiguous"]
    if not rows:
        return []
    big = max(rows, key=lambda r: r["bytes"])
    ratio = round(big["ratio_vs_memcpy"], 3)
    return [target(f"NIXL page transfer / memcpy, {big['bytes'] / MiB:.0f} MiB contiguous", ratio, ">= 0.5",
                   ratio >= 0.5)]


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# KV transfer benchmark", "",
        f"{res['started']} · commit {str(res['git']['commit'])[:10]}{' (dirty)' if res['git']['dirty'] else ''}"
        f" · {res['machine']['cpu_model']} ({res['machine']['cpu_count']} CPUs) · {res['setup']['note']}"
        f" · UCX env {res['setup']['ucx_env'] or 'defaults'} · NIXL progress thread: "
        f"{'on' if res['nixl_progress_thread'] else 'off (1 ms library thread)'} · load average "
        f"at start {res['setup']['loadavg_start']}, at end {res['setup']['loadavg_end']}", "",
        f"`{res['command']}`", "",
        f"Geometry: {res['geometry']}; {res['bytes_per_page_all_layers'] // 1024} KiB per page "
        "(all layers, K+V). Time = send until decode's receiver reports Success (nixl) or the "
        "whole Prefill stream incl. unpack (grpc); memcpy = one local torch copy of the same "
        "bytes. Medians of alternating rounds (memcpy, 1-thread memcpy, nixl contiguous, nixl random).", "",
        f"memcpy = torch's copy with the process's {res['setup']['torch_threads']} threads (the target's "
        "baseline); memcpy 1T = the same copy on one thread, what UCX's single-threaded cma copy competes with.", "",
        "| backend | page map | pages | MiB | GB/s | memcpy GB/s | ratio vs memcpy (per-round min-max) | memcpy 1T GB/s | ratio vs 1T |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["transfer"]:
        one = (f"{r['memcpy_1thread_gbps']:.2f} | {r['ratio_vs_memcpy_1thread']:.2f}" if "memcpy_1thread_gbps" in r
               else "- | -")
        spread = r.get("ratio_vs_memcpy_per_round")
        ratio = f"{r['ratio_vs_memcpy']:.2f}" + (f" ({min(spread):.2f}-{max(spread):.2f})" if spread else "")
        lines.append(f"| {r['backend']} | {r['mapping']} | {r['pages']} | {r['bytes'] / MiB:.1f} | "
                     f"{r['gbps']:.2f} | {r['memcpy_gbps']:.2f} | {ratio} | {one} |")
    lines += ["", "| handshake (empty transfer) | p50 ms | p99 ms | n |", "|---|---:|---:|---:|"]
    for k, v in res["handshake"].items():
        lines.append(f"| {k} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v['n']} |")
    lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else '**no**'} |"
              for t in res["targets"]]
    lines += ["", "Handshake rows: `grpc_stream_empty_transfer` = Prefill bidi stream (start -> room "
              "-> allocation -> empty KvChunk + aux + done) between two processes with a minimal "
              "servicer; `grpc_stream_plus_nixl_aux` = the same with the aux row written by NIXL "
              "and decode polling its receiver; `nixl_aux_only_one_way` = NIXL aux write until "
              "decode sees Success. The full Prefill service (engine included) is measured when "
              "the service lands.", ""]
    md = "\n".join(lines)
    write_json(out / "transfer_bench.json", res)
    (out / "transfer_bench.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out / 'transfer_bench.json'} and {out / 'transfer_bench.md'}")


if __name__ == "__main__":
    main()
