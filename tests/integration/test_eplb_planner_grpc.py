"""EplbPlanner servicer on a real gRPC server (loopback) with a real client."""
import threading
from concurrent import futures

import grpc
import pytest
from prometheus_client import CollectorRegistry
from tandem.config import EplbPlannerConfig
from tandem.eplb.plans import plan_from_proto
from tandem.eplb_planner.servicer import EplbPlannerServicer
from tandem.v1 import eplb_pb2, eplb_pb2_grpc

L, E = 2, 8


@pytest.fixture
def planner_server():
    cfg = EplbPlannerConfig(ep_size=4, ep_num_redundant_experts=4, eplb_rebalance_num_iterations=10)
    servicer = EplbPlannerServicer(cfg, L, E, 1, registry=CollectorRegistry())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    eplb_pb2_grpc.add_EplbPlannerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, eplb_pb2_grpc.EplbPlannerStub(channel)
    servicer.close()
    channel.close()
    server.stop(grace=1).wait()


def report(worker, passes, hot=0, counts=None, n_logical=E):
    rows = counts or [[100 if e == hot else 1 for e in range(E)] for _ in range(L)]
    return eplb_pb2.ReportLoadRequest(
        worker_id=worker,
        layers=[eplb_pb2.LayerLoad(layer=i, counts=row) for i, row in enumerate(rows)],
        num_forward_passes=passes,
        num_logical_experts=n_logical,
    )


def test_report_watch_get(planner_server):
    _, stub = planner_server
    with pytest.raises(grpc.RpcError) as err:
        stub.GetPlan(eplb_pb2.GetPlanRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    received = []
    got_two = threading.Event()
    stream = stub.WatchPlans(eplb_pb2.WatchPlansRequest(worker_id="w0"), timeout=30)

    def consume():
        for plan in stream:
            received.append(plan)
            if len(received) == 2:
                got_two.set()
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()

    r = stub.ReportLoad(report("w0", 5), timeout=5)
    assert r.accepted and r.latest_plan_version == -1
    r = stub.ReportLoad(report("w1", 5), timeout=5)  # 10 passes -> plan v1
    assert r.accepted and r.latest_plan_version == 1

    plan = stub.GetPlan(eplb_pb2.GetPlanRequest(), timeout=5)
    assert plan.version == 1 and plan.num_physical_experts == 12 and plan.num_ranks == 4
    assert len(plan.layers) == L
    assert plan.balancedness_after > plan.balancedness_before and plan.num_moves > 0
    loc = plan_from_proto(plan, num_layers=L)
    assert loc.logical_count[0, 0] >= 2  # the hot expert got replicas

    # bad report: rejected with a message, plan unchanged
    bad = stub.ReportLoad(report("w2", 10, counts=[[1] * 5, [1] * 5]), timeout=5)
    assert not bad.accepted and "expected 8" in bad.message
    dup = eplb_pb2.ReportLoadRequest(
        worker_id="w2", layers=[eplb_pb2.LayerLoad(layer=0, counts=[1] * E)] * 2, num_forward_passes=1
    )
    assert "twice" in stub.ReportLoad(dup, timeout=5).message
    assert stub.GetPlan(eplb_pb2.GetPlanRequest(), timeout=5).version == 1

    # load moves to another expert -> plan v2 reaches the watcher
    stub.ReportLoad(report("w0", 10, hot=5), timeout=5)
    assert got_two.wait(15)
    assert [p.version for p in received] == [1, 2]
    stream.cancel()

    # a new watcher gets the current plan first; since_version skips older ones
    late = stub.WatchPlans(eplb_pb2.WatchPlansRequest(worker_id="w3"), timeout=10)
    assert next(late).version == 2
    late.cancel()


def test_watch_since_version_and_shutdown(planner_server):
    servicer, stub = planner_server
    stub.ReportLoad(report("w0", 10), timeout=5)
    stream = stub.WatchPlans(eplb_pb2.WatchPlansRequest(worker_id="w0", since_version=1), timeout=30)
    out = []
    done = threading.Event()

    def consume():
        try:
            for plan in stream:
                out.append(plan.version)
        except grpc.RpcError:
            pass
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    stub.ReportLoad(report("w0", 10, hot=3), timeout=5)
    servicer.close()  # ends open streams
    assert done.wait(10)
    assert out == [2]
