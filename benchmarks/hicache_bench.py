"""HiCache on the engine, every ratio against the same engine with HiCache OFF, in one run.

TTFT part (``--prefix-len`` + ``--suffix-len`` new tokens, 1 output token; two engines loaded
side by side, HiCache off and on, the order alternating per repeat; each row a fresh prefix):

* ``off``: HiCache off, the whole prompt prefilled: the baseline of every ratio;
* ``on``: HiCache on (write_through + file storage): the same prefill, backed up meanwhile
  (skipped backups counted: the gate wants 0);
* ``host``: that prefix evicted from the device (``cache.evict``), loaded back from host;
* ``storage_warm``: device and host emptied (``flush_cache``), loaded from the storage files
  while they are in the page cache;
* ``storage_cold``: the same after the storage files were flushed to disk and dropped from the
  page cache (``fdatasync`` + ``posix_fadvise(DONTNEED)``; residency probed with
  ``preadv(RWF_NOWAIT)``, reported).

Also measured in the run: host <-> device page transfer of the prefix's pages (scattered, as
after churn) by each io backend and host layout, against a pinned ``copy_`` of the same bytes;
the storage folder's cold read bandwidth (one stream, and the engine's reader threads, page
by page); whether grouping a chain's pages into one file per segment would read faster cold
than one file per page (the same pages both ways); on CUDA a torch-profiler trace of one host load-back (``--trace``), in which each
layer's copy should overlap the compute of the layers before it (counted from the trace).

Multi-turn part: ``--conversations`` chats x ``--turns`` turns; a turn sends the chat's
history plus ``--turn-len`` new user tokens and appends ``--output-len`` generated tokens.
Turns go round robin over the chats, ``--concurrency`` chats at a time, so when a chat comes
back its history has left the device pool (sized so the final working set is about
``--working-set`` x the pool; host pool ``--hicache-ratio`` x the device pool). With and
without HiCache on the same workload. Throughput = prompt tokens served / wall time; hit
rate = cached / prompt tokens. The defaults are the fixed GPU workload (8 x 6 turns, 512 new
tokens and 32 generated per turn, working set 4x, host 6x).

    python benchmarks/engine_bench.py --build llama8b /tmp/llama8b
    python benchmarks/hicache_bench.py --model /tmp/llama8b --device cuda --dtype bfloat16 \\
        --out benchmarks/results/gpu/hicache_bench_llama8b_h100.json
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "libs"))
sys.path.insert(0, str(REPO))

from tandem.engine import EngineCore, SamplingParams  # noqa: E402
from tandem.hicache.config import STORAGE_READ_THREADS  # noqa: E402
from tandem.hicache.io import DirectCopier, IndexedCopier, PageMove  # noqa: E402

from benchmarks.common.plots import bar_panels  # noqa: E402
from benchmarks.common.results import print_targets, provenance, target, write_json  # noqa: E402

# GPU gates (issue 27) and the CPU targets (the demo model on this kind of machine).
GPU = dict(prefill_on_over_off=1.05, host_over_off=0.2, host_over_pcie=1.3, storage_over_off=0.5,
           storage_over_disk=1.3, transfer_over_copy=0.7, hit_rate=0.70, speedup=1.5)
CPU = dict(host_over_off=0.3, hit_rate=0.70, speedup=1.5)


def sync(eng: EngineCore) -> None:
    """Nothing of an earlier row still runs: copies, storage writes, the device."""
    if eng.hicache is not None:
        eng.cache.wait_io()
    if eng.device.startswith("cuda"):
        torch.cuda.synchronize()


def run_to_first_token(eng: EngineCore, prompt: list[int]) -> float:
    sync(eng)
    t0 = time.perf_counter()
    rid = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while True:
        if any(o.rid == rid and o.finished for o in eng.step()):
            return time.perf_counter() - t0


def engine(args, hicache: bool, pool_tokens: int, **kw) -> EngineCore:
    if hicache:
        kw = dict(enable_hierarchical_cache=True, hicache_mem_layout=args.mem_layout,
                  hicache_io_backend=args.io_backend, **kw)
    return EngineCore(args.model, device=args.device, dtype=args.dtype, max_total_tokens=pool_tokens,
                      max_running_requests=8, cuda_graph_max_bs=8, **kw)


def free() -> None:
    """Give the device memory of engines no longer referenced back (before the next ones load)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- page cache ----------------------------------------------------------------------------------
def drop_page_cache(folder: str) -> dict:
    """Flush every file under folder to disk and drop it from the page cache; probe 3 spots of each
    file with a read that fails unless the data is cached (RWF_NOWAIT)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"files": len(files), "resident_probes": resident_probes(files)}


def resident_probes(files: list[str]) -> str | None:
    """'k/n': probes (first, middle, last 4 KiB of each file) found in the page cache."""
    if not hasattr(os, "RWF_NOWAIT"):
        return "unknown (no RWF_NOWAIT)"
    hit = n = 0
    buf = bytearray(4096)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            for off in sorted({0, (size // 2) & ~4095, max(0, size - 4096) & ~4095}):
                n += 1
                try:
                    os.preadv(fd, [buf], off, os.RWF_NOWAIT)
                    hit += 1
                except BlockingIOError:
                    pass
                except OSError as e:  # the file system has no non-blocking reads
                    return f"unknown ({e.strerror})"
        finally:
            os.close(fd)
    return f"{hit}/{n}"


def cold_read_bandwidth(folder: str, nbytes: int, chunk: int) -> dict:
    """Bytes/s of reading a file of nbytes from the storage folder's disk with an empty page
    cache: one stream of 16 MiB reads, and the engine's reader threads reading ``chunk`` bytes at
    a time (a page each)."""
    path = os.path.join(folder, "cold-read-probe.bin")
    block = os.urandom(1 << 20) * 16
    with open(path, "wb") as f:
        for _ in range(-(-nbytes // len(block))):
            f.write(block)
    size = os.path.getsize(path)
    out = {"file_bytes": size}
    try:
        buf = torch.empty(16 << 20, dtype=torch.uint8, pin_memory=torch.cuda.is_available()).numpy()
        out["resident_after_drop"] = drop_page_cache(folder)["resident_probes"]
        fd = os.open(path, os.O_RDONLY)
        t0 = time.perf_counter()
        off = 0
        while off < size:
            off += os.preadv(fd, [buf], off)
        out["one_stream_bytes_per_s"] = size / (time.perf_counter() - t0)
        os.close(fd)
        drop_page_cache(folder)
        threads = min(STORAGE_READ_THREADS, os.cpu_count() or 1)
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=torch.cuda.is_available()).numpy()
                for _ in range(threads)]
        local = threading.local()
        fd = os.open(path, os.O_RDONLY)

        def read(off: int) -> None:
            if not hasattr(local, "buf"):
                local.buf = bufs.pop()
            os.preadv(fd, [local.buf[:min(chunk, size - off)]], off)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(0, size, chunk)))
        out[f"{threads}_threads_bytes_per_s"] = size / (time.perf_counter() - t0)
        os.close(fd)
        out["threads"] = threads
        out["bytes_per_s"] = max(out["one_stream_bytes_per_s"], out[f"{threads}_threads_bytes_per_s"])
    finally:
        os.remove(path)
    return out


def _page_reader(page_bytes: int, threads: int):
    """read(path, pages): every page of a file, one read each, into the thread's own buffer."""
    bufs = [bytearray(page_bytes) for _ in range(threads)]
    local = threading.local()

    def read(item) -> None:
        if not hasattr(local, "buf"):
            local.buf = bufs.pop()
        path, pages = item
        fd = os.open(path, os.O_RDONLY)
        try:
            for j in range(pages):
                os.preadv(fd, [local.buf], j * page_bytes)
        finally:
            os.close(fd)

    return read


def segment_files_read(folder: str, page_bytes: int, n_pages: int, segment: int) -> dict:
    """Is grouping a chain's pages into one file per ``segment`` pages faster to read cold than one
    file per page? The same n_pages pages, written both ways, each read cold by the engine's
    reader threads page by page (open, read, close per page file; one open per segment)."""
    threads = min(STORAGE_READ_THREADS, os.cpu_count() or 1)
    root = tempfile.mkdtemp(prefix="segments-", dir=folder)
    page = os.urandom(page_bytes)
    out = {"page_bytes": page_bytes, "pages": n_pages, "segment_pages": segment, "threads": threads}
    try:
        for name, per_file in (("page_files", 1), ("segment_files", segment)):
            files = []
            for i in range(0, n_pages, per_file):
                path = os.path.join(root, f"{name}-{i}")
                with open(path, "wb") as f:
                    for _ in range(min(per_file, n_pages - i)):
                        f.write(page)
                files.append((path, min(per_file, n_pages - i)))
            drop_page_cache(root)
            read_file = _page_reader(page_bytes, threads)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read_file, files))
            out[f"{name}_bytes_per_s"] = n_pages * page_bytes / (time.perf_counter() - t0)
            for path, _ in files:
                os.remove(path)
        out["segment_over_page_files"] = out["segment_files_bytes_per_s"] / out["page_files_bytes_per_s"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


# ---- host <-> device transfer --------------------------------------------------------------------
def timed(fn, reps: int, cuda: bool) -> float:
    """Median seconds of fn() (synchronized around each call: launch costs included)."""
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pinned_copy(nbytes: int, device, reps: int, cuda: bool) -> dict:
    """Seconds of one copy_ of nbytes between a pinned host buffer and the device, each way."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return {"pinned_copy_h2d_s": timed(lambda: dev.copy_(host, non_blocking=True), reps, cuda),
            "pinned_copy_d2h_s": timed(lambda: host.copy_(dev, non_blocking=True), reps, cuda)}


def transfer_bandwidth(eng: EngineCore, n_pages: int, reps: int) -> dict:
    """The prefix's pages (scattered on both sides) device -> host and host -> device (layer by
    layer, as a load-back) by each copier and host layout, and a pinned copy_ of the same bytes.
    Run on an idle, flushed engine (the pages moved are free ones)."""
    from tandem.hicache import HostKVPool

    pool, cuda = eng.pool, eng.device.startswith("cuda")
    rng = random.Random(0)
    n_pages = min(n_pages, pool.num_pages)
    dev_pages = rng.sample(range(pool.num_pages), n_pages)
    ctl = eng.hicache
    nbytes = n_pages * ctl.host.bytes_per_page
    out = {"pages": n_pages, "bytes": nbytes, **pinned_copy(nbytes, pool.k_buffers[0].device, reps, cuda)}
    hosts = {ctl.host.layout: ctl.host}
    other = "page_first" if ctl.host.layout == "layer_first" else "layer_first"
    hosts[other] = HostKVPool(pool.num_layers, n_pages, pool.page_size, pool.num_kv_heads, pool.head_dim, pool.dtype,
                              other, pin_memory=cuda)
    copiers = {"direct": DirectCopier, "kernel": IndexedCopier}  # kernel: the io backend (indexed copies on CPU)
    if cuda:
        from tandem.engine.kernels.kv_transfer import TritonCopier

        copiers["kernel"] = TritonCopier
    for layout, host in hosts.items():
        host_pages = rng.sample(range(host.num_pages), n_pages)
        for name, cls in copiers.items():
            copier = cls(pool, host)

            def d2h(copier=copier, host_pages=host_pages):
                copier.to_host(PageMove(dev_pages, host_pages))

            def h2d(copier=copier, host_pages=host_pages):
                move = PageMove(dev_pages, host_pages)
                for layer in range(pool.num_layers):
                    copier.to_device(move, layer)

            n = reps if name == "kernel" else max(2, reps // 3)  # direct: a copy per page per layer
            out[f"{name}_{layout}_d2h_s"] = timed(d2h, n, cuda)
            out[f"{name}_{layout}_h2d_s"] = timed(h2d, n, cuda)
    del hosts
    gc.collect()
    for k in [k for k in out if k.endswith("_s")]:
        out[k.removesuffix("_s") + "_gbps"] = nbytes / out[k] / 1e9
    return out


# ---- the load-back trace -------------------------------------------------------------------------
def loadback_trace(eng: EngineCore, prompt: list[int], path: Path) -> dict:
    """A torch-profiler trace of a host load-back of prompt's prefix (already on host, evicted
    from the device) and the overlap of its per-layer copies with compute, read from the trace."""
    from torch.profiler import ProfilerActivity, profile

    sync(eng)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_to_first_token(eng, prompt)
        torch.cuda.synchronize()
    raw = path.with_suffix(".tmp.json")
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    raw.unlink()
    return {"trace": str(path), **copy_overlap(trace["traceEvents"])}


def copy_overlap(events: list) -> dict:
    """From a chrome trace: the load-back's copies (transfer kernels or host-to-device memcpys on
    the stream where the first one runs) and how many of them (after the first) run while a
    compute kernel runs on another stream."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy")]
    copies = [e for e in gpu if "kv_transfer" in e.get("name", "") or "HtoD" in e.get("name", "")]
    if not copies:
        return {"copies": 0}
    first = min(copies, key=lambda e: e["ts"])
    stream = first["args"].get("stream")
    load = sorted((e for e in copies if e["args"].get("stream") == stream), key=lambda e: e["ts"])
    compute = [e for e in gpu if e["cat"] == "kernel" and e["args"].get("stream") != stream
               and "kv_transfer" not in e["name"]]
    overlapped = 0
    for c in load[1:]:
        if any(k["ts"] < c["ts"] + c["dur"] and c["ts"] < k["ts"] + k["dur"] for k in compute):
            overlapped += 1
    last_copy_end = max(c["ts"] + c["dur"] for c in load)
    first_compute = min((k["ts"] for k in compute if k["ts"] >= first["ts"]), default=None)
    return {"copies": len(load), "copies_overlapping_compute": overlapped,
            "compute_started_before_last_copy_ended": first_compute is not None and first_compute < last_copy_end,
            "copy_span_us": last_copy_end - first["ts"]}


# ---- TTFT part -----------------------------------------------------------------------------------
def ttft_part(args, storage_dir: str, out: Path | None) -> dict:
    """The TTFT rows, the transfer and cold read bandwidths, the trace; engines freed after."""
    engines = {"off": engine(args, False, args.ttft_pool_tokens),
               "on": engine(args, True, args.ttft_pool_tokens, hicache_storage_backend="file",
                            hicache_storage_dir=storage_dir, hicache_storage_prefetch_policy="wait_complete")}
    try:
        return ttft_measure(args, engines, storage_dir, out)
    finally:
        engines.clear()
        free()


def ttft_measure(args, engines: dict, storage_dir: str, out: Path | None) -> dict:
    cuda = args.device.startswith("cuda")
    on = engines["on"]
    ctl, c = on.hicache, on.hicache.counters
    rng = random.Random(0)
    vocab = min(on.model_config.vocab_size, 32000)

    def fresh(n):
        return [rng.randrange(10, vocab) for _ in range(n)]

    def one_round(rows: dict | None) -> None:
        prefix = fresh(args.prefix_len)
        t = {}
        pair = list(engines.items())
        for name, eng in pair if rows is None or len(rows["off"]) % 2 == 0 else pair[::-1]:
            skipped = c.backup_skipped_pages
            t[name] = run_to_first_token(eng, (prefix if name == "on" else fresh(args.prefix_len)) + fresh(args.suffix_len))
            if name == "on":
                t["skipped"] = c.backup_skipped_pages - skipped
        sync(on)
        on.cache.evict(on.cache.evictable_pages)  # device -> host
        assert on.cached_prefix_tokens(prefix + [0]) == 0
        before, bytes_before = c.host_hit_tokens, c.load_back_bytes
        t["host"] = run_to_first_token(on, prefix + fresh(args.suffix_len))
        assert c.host_hit_tokens - before >= args.prefix_len - on.page_size, "no host hit"
        t["host_bytes"] = c.load_back_bytes - bytes_before
        for row in ("storage_warm", "storage_cold"):
            sync(on)
            on.flush_cache()  # device and host emptied; storage keeps the pages
            if row == "storage_cold":
                t["dropped"] = drop_page_cache(storage_dir)
            before, bytes_before = c.storage_hit_tokens, c.load_back_bytes
            t[row] = run_to_first_token(on, prefix + fresh(args.suffix_len))
            assert c.storage_hit_tokens - before >= args.prefix_len - on.page_size, "no storage hit"
            t[f"{row}_bytes"] = c.load_back_bytes - bytes_before
        on.flush_cache()
        if rows is not None:
            for k, v in t.items():
                rows.setdefault(k, []).append(v)

    one_round(None)  # warm-up: every path once (kernels compiled, files created)
    rows: dict = {"off": []}
    for _ in range(args.repeats):
        one_round(rows)
    med = {k: statistics.median(rows[k]) for k in ("off", "on", "host", "storage_warm", "storage_cold")}
    result = {"rows_s": rows, "median_s": med, "skipped_backups": sum(rows["skipped"]),
              "over_off": {k: v / med["off"] for k, v in med.items()},
              "host_bytes": int(statistics.median(rows["host_bytes"])),
              "storage_bytes": int(statistics.median(rows["storage_cold_bytes"])),
              "storage_corrupt_pages": ctl.storage_corrupt_pages}
    sync(on)
    on.flush_cache()
    result["transfer"] = transfer_bandwidth(on, args.prefix_len // on.page_size, args.transfer_repeats)
    result["cold_read"] = cold_read_bandwidth(storage_dir, result["storage_bytes"], ctl.host.bytes_per_page)
    result["segment_files"] = segment_files_read(storage_dir, ctl.host.bytes_per_page, args.prefix_len // on.page_size,
                                                 args.segment_pages)
    if cuda and out is not None and args.trace:
        prefix = fresh(args.prefix_len)
        run_to_first_token(on, prefix + fresh(args.suffix_len))
        sync(on)
        on.cache.evict(on.cache.evictable_pages)
        result["loadback_trace"] = loadback_trace(on, prefix + fresh(args.suffix_len),
                                                  out.with_name(out.stem + "_loadback_trace.json.gz"))
    return result


# ---- multi-turn part -----------------------------------------------------------------------------
def multi_turn(args, hicache: bool) -> dict:
    final_history = args.turns * (args.turn_len + args.output_len)
    working_set = args.conversations * final_history
    # At least the running chats' final histories must fit (plus a page each for decode).
    pool_tokens = max(int(working_set / args.working_set), args.concurrency * (final_history + 32))
    kw = dict(hicache_ratio=args.hicache_ratio) if hicache else {}
    eng = engine(args, hicache, pool_tokens, **kw)
    rng = random.Random(1)
    vocab = min(eng.model_config.vocab_size, 32000)
    histories = [[] for _ in range(args.conversations)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    prompt_tokens = cached = 0
    kinds: dict = {}
    t0 = time.perf_counter()
    for _ in range(args.turns):
        for start in range(0, args.conversations, args.concurrency):
            pending = {}
            for c in range(start, min(start + args.concurrency, args.conversations)):
                histories[c] += [rng.randrange(10, vocab) for _ in range(args.turn_len)]
                pending[eng.add_request(histories[c], sp)] = c
            while pending:
                s0 = time.perf_counter()
                outs = eng.step()
                kind = eng.stats().step_kind
                k = kinds.setdefault(kind, [0, 0.0])
                k[0] += 1
                k[1] += time.perf_counter() - s0
                for o in outs:
                    c = pending.get(o.rid)
                    if c is None:
                        continue
                    histories[c] += o.new_token_ids  # the engine keeps its own copy of the prompt
                    if o.finished:
                        prompt_tokens += o.num_prompt_tokens
                        cached += o.cached_tokens
                        del pending[o.rid]
    if eng.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"device_pool_tokens": pool_tokens, "final_working_set_tokens": working_set,
           "working_set_over_pool": working_set / pool_tokens, "prompt_tokens": prompt_tokens, "cached_tokens": cached,
           "hit_rate": cached / prompt_tokens, "wall_s": wall, "prompt_tokens_per_s": prompt_tokens / wall,
           "steps_by_kind": {k: {"steps": n, "host_s": s} for k, (n, s) in kinds.items()}}
    if hicache:
        c = eng.hicache.counters
        out.update(host_hit_tokens=c.host_hit_tokens, load_back_bytes=c.load_back_bytes, backup_bytes=c.backup_bytes,
                   backup_skipped_pages=c.backup_skipped_pages,
                   host_pool_tokens=eng.hicache.host.num_pages * eng.page_size)
    del eng
    free()
    return out


# ---- targets ---------------------------------------------------------------------------------------
def targets(r: dict, cuda: bool) -> list[dict]:
    t, m = r["ttft"], r["multi_turn"]
    med, over = t["median_s"], t["over_off"]
    hit, speedup = m["with_hicache"]["hit_rate"], m["speedup"]
    if not cuda:
        return [target("host load-back TTFT / recompute with HiCache off", round(over["host"], 3),
                       f"<= {CPU['host_over_off']}", over["host"] <= CPU["host_over_off"]),
                target("multi-turn hit rate", round(hit, 3), f">= {CPU['hit_rate']}", hit >= CPU["hit_rate"]),
                target("multi-turn throughput / without HiCache", round(speedup, 3), f">= {CPU['speedup']}",
                       speedup >= CPU["speedup"])]
    tr, cold = t["transfer"], t["cold_read"]
    layout = r["args"]["mem_layout"]
    h2d_bw = tr["bytes"] / tr["pinned_copy_h2d_s"]
    host_goal = max(GPU["host_over_off"] * med["off"], GPU["host_over_pcie"] * t["host_bytes"] / h2d_bw)
    storage_goal = max(GPU["storage_over_off"] * med["off"], GPU["storage_over_disk"] * t["storage_bytes"] / cold["bytes_per_s"])
    out = [target("prefill TTFT HiCache on / off", round(over["on"], 3), f"<= {GPU['prefill_on_over_off']}",
                  over["on"] <= GPU["prefill_on_over_off"]),
           target("skipped backups during those prefills", t["skipped_backups"], "== 0", t["skipped_backups"] == 0),
           target("host load-back TTFT (s)", round(med["host"], 4), f"<= {host_goal:.4f} (max of 0.2x off, 1.3x bytes / "
                  "pinned H2D bandwidth)", med["host"] <= host_goal),
           target("storage load-back TTFT, cold (s)", round(med["storage_cold"], 4), f"<= {storage_goal:.4f} (max of 0.5x "
                  "off, 1.3x bytes / cold read bandwidth)", med["storage_cold"] <= storage_goal)]
    for d in ("h2d", "d2h"):
        key = f"kernel_{layout}_{d}_s"
        ratio = tr[f"pinned_copy_{d}_s"] / tr[key]
        out.append(target(f"{d} page transfer (kernel, {layout}) / pinned copy_", round(ratio, 3),
                          f">= {GPU['transfer_over_copy']}", ratio >= GPU["transfer_over_copy"]))
    out += [target("multi-turn hit rate", round(hit, 3), f">= {GPU['hit_rate']}", hit >= GPU["hit_rate"]),
            target("multi-turn throughput / without HiCache", round(speedup, 3), f">= {GPU['speedup']}",
                   speedup >= GPU["speedup"])]
    trace = t.get("loadback_trace")
    if trace:
        ok = trace.get("copies_overlapping_compute", 0) > 0 and trace.get("compute_started_before_last_copy_ended")
        out.append(target("load-back trace: layer copies overlapping compute", trace.get("copies_overlapping_compute"),
                          "> 0, compute starts before the last copy ends", bool(ok)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "tandem-demo-dense"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefix-len", type=int, default=7936)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--ttft-pool-tokens", type=int, default=16384, help="device pool of the TTFT engines")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transfer-repeats", type=int, default=5)
    ap.add_argument("--mem-layout", default="layer_first", choices=["layer_first", "page_first"])
    ap.add_argument("--io-backend", default="kernel", choices=["direct", "kernel"])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--turn-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--hicache-ratio", type=float, default=6.0, help="host pool / device pool (multi-turn part)")
    ap.add_argument("--working-set", type=float, default=4.0, help="final working set / device pool")
    ap.add_argument("--segment-pages", type=int, default=16, help="pages per file in the grouped-files read test")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="skip the profiler trace (CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="write JSON results here (plus .png and .md next to it)")
    args = ap.parse_args(argv)
    prov = provenance(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    out = Path(args.out) if args.out else None
    storage_dir = tempfile.mkdtemp(prefix="tandem-hicache-bench-", dir=os.environ.get("TANDEM_BENCH_STORAGE_DIR"))
    try:
        ttft = ttft_part(args, storage_dir, out)
    finally:
        shutil.rmtree(storage_dir, ignore_errors=True)
    print(json.dumps({"ttft_median_s": ttft["median_s"], "over_off": ttft["over_off"]}, indent=2))
    without = multi_turn(args, hicache=False)
    with_hi = multi_turn(args, hicache=True)
    result = {"benchmark": "hicache_bench", **prov, "args": vars(args), "storage_dir_fs": storage_dir,
              "noise": "medians of --repeats rows; the TTFT engines alternate their order per repeat",
              "ttft": ttft, "multi_turn": {"without_hicache": without, "with_hicache": with_hi,
                                           "speedup": with_hi["prompt_tokens_per_s"] / without["prompt_tokens_per_s"]}}
    result["targets"] = targets(result, cuda)
    print(json.dumps({"transfer": ttft["transfer"], "cold_read": ttft["cold_read"],
                      "trace": ttft.get("loadback_trace"), "multi_turn": result["multi_turn"]}, indent=2, default=str))
    print_targets(result["targets"])
    if out is not None:
        write_json(out, result)
        med = ttft["median_s"]
        bar_panels([
            (f"TTFT, {args.prefix_len}-token prefix", list(med), [v * 1e3 for v in med.values()], "ms (median)"),
            ("multi-turn hit rate", ["without", "with HiCache"], [without["hit_rate"], with_hi["hit_rate"]],
             "cached / prompt tokens"),
            ("multi-turn throughput", ["without", "with HiCache"],
             [without["prompt_tokens_per_s"], with_hi["prompt_tokens_per_s"]], "prompt tokens/s"),
        ], out.with_suffix(".png"), f"hicache_bench {args.device} {str(prov['git'].get('commit'))[:10]}"
           f"{' (dirty)' if prov['git'].get('dirty') else ''}")
        out.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")
    return 0


def markdown(r: dict) -> str:
    t, m, g = r["ttft"], r["multi_turn"], r["git"]
    med, tr, cold = t["median_s"], t["transfer"], t["cold_read"]
    gpus = r["machine"].get("gpus") or []
    card = gpus[0]["name"] if gpus else r["machine"].get("cpu_model")
    lines = [
        "# HiCache (benchmarks/hicache_bench.py)", "",
        f"commit {g.get('commit')} (dirty: {g.get('dirty')}), {card}, started {r['started']}; {r['noise']}.", "",
        f"`{r['command']}`", "",
        f"| TTFT, {r['args']['prefix_len']} + {r['args']['suffix_len']} tokens (median) | ms | x HiCache off |",
        "|---|---|---|",
        *[f"| {k} | {v * 1e3:.1f} | {t['over_off'][k]:.3f} |" for k, v in med.items()], "",
        f"Skipped backups: {t['skipped_backups']}. Load-back bytes: host {t['host_bytes']:,}, storage "
        f"{t['storage_bytes']:,}. Storage cold rows: page cache dropped, resident probes after the drop "
        f"{[d.get('resident_probes') for d in t['rows_s'].get('dropped', [])]}.", "",
        f"| transfer of {tr['pages']} scattered pages ({tr['bytes'] / 1e9:.2f} GB) | GB/s |", "|---|---|",
        *[f"| {k.removesuffix('_gbps')} | {v:.2f} |" for k, v in tr.items() if k.endswith("_gbps")], "",
        f"Storage folder cold read: one stream {cold['one_stream_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"{cold['threads']} threads page by page {cold[str(cold['threads']) + '_threads_bytes_per_s'] / 1e9:.2f} GB/s "
        f"(resident probes after the drop: {cold.get('resident_after_drop')}).", "",
        f"Page files grouped by chain segment ({t['segment_files']['segment_pages']} pages a file), read cold: "
        f"{t['segment_files']['segment_over_page_files']:.2f}x the bandwidth of one file per page "
        f"({t['segment_files']['page_files_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"{t['segment_files']['page_bytes']:,}-byte pages).", "",
    ]
    trace = t.get("loadback_trace")
    if trace:
        lines += [f"Load-back trace `{Path(trace['trace']).name}`: {trace.get('copies')} layer copies, "
                  f"{trace.get('copies_overlapping_compute')} of them (after the first) overlap compute kernels; "
                  f"compute starts before the last copy ends: {trace.get('compute_started_before_last_copy_ended')}.", ""]
    lines += [
        "| multi-turn | hit rate | prompt tokens/s | wall s | working set / pool |", "|---|---|---|---|---|",
        *[f"| {k} | {v['hit_rate']:.3f} | {v['prompt_tokens_per_s']:.0f} | {v['wall_s']:.1f} | "
          f"{v['working_set_over_pool']:.2f} |" for k, v in m.items() if isinstance(v, dict)],
        "", f"speedup {m['speedup']:.2f}x", "",
        *[f"- {x['target']}: {x['value']} (goal {x['goal']}): {'met' if x['met'] else 'NOT met'}" for x in r["targets"]],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
