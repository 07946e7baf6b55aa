"""A decode worker (aggregated) with --tp-size 2: it serves TP 1's greedy tokens; when its follower
rank is killed mid-request, the request ends with a gRPC error, the worker takes itself out (health
NOT_SERVING, then it exits) and no process of it is left."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from tandem.engine import EngineCore, SamplingParams
from tandem.v1 import decode_pb2, decode_pb2_grpc

from tests.support.clients import generate, sampling
from tests.support.models import demo_model
from tests.support.procs import start_service

pytestmark = pytest.mark.timeout(300)
PROMPT = [5, 17, 301, 2000, 44, 9, 77, 1234, 8000, 3, 3, 610]


def children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def is_rank(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"spawn_main" in cmd and b"resource_tracker" not in cmd


def test_tp2_decode_worker_serves_and_a_dead_rank_takes_it_out():
    path = demo_model("tandem-demo-dense")
    torch.set_num_threads(1)
    want = EngineCore(path, max_total_tokens=4096, dtype="float32", device="cpu", disable_overlap_schedule=True)
    rid = want.add_request(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    ref = []
    while want.has_work():
        ref += [t for o in want.step() if o.rid == rid for t in o.new_token_ids]
    svc = start_service("tandem.decode", "--model-path", path, "--max-total-tokens", "4096", "--dtype", "float32",
                        "--tp-size", "2", "--torch-num-threads", "1", "--dist-timeout", "60",
                        "--shutdown-grace-period", "5")
    ranks = [p for p in children(svc.proc.pid) if is_rank(p)]
    try:
        assert len(ranks) == 1, ranks
        tokens, _ = generate(svc.grpc_address, PROMPT, sampling(8, ignore_eos=True))
        assert tokens == ref
        errors, decoding = [], threading.Event()

        def long_request():
            try:
                with grpc.insecure_channel(svc.grpc_address) as ch:
                    stream = decode_pb2_grpc.DecodeStub(ch).Generate(
                        decode_pb2.GenerateRequest(input_ids=PROMPT, sampling=sampling(2000, ignore_eos=True)),
                        timeout=120)
                    for chunk in stream:
                        if chunk.token_ids:
                            decoding.set()
            except grpc.RpcError as exc:
                errors.append(exc.code())
            finally:
                decoding.set()

        t = threading.Thread(target=long_request)
        t.start()
        assert decoding.wait(120)  # its first tokens came: the rank dies mid-request, not before it
        assert not errors, errors
        os.kill(ranks[0], signal.SIGKILL)
        t.join(120)
        assert errors and errors[0] != grpc.StatusCode.OK, errors
        # It takes itself out: health leaves SERVING at once (graceful shutdown), then it exits.
        if svc.proc.poll() is None:
            try:
                assert svc.health_status() != health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                pass  # its server is already stopping
        deadline = time.monotonic() + 60
        while svc.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert svc.proc.poll() is not None, "the worker kept running with a dead rank"
        assert "a rank of this worker failed" in svc.log()
    finally:
        svc.stop(signal.SIGKILL if svc.proc.poll() is None else signal.SIGTERM)
    assert not [p for p in ranks if alive(p)], "a rank outlived its worker"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
