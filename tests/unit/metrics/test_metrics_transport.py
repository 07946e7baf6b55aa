"""StatsSender -> ZMQ -> MetricsPublisher: delivery, publisher restart, never blocking."""
from __future__ import annotations

import os
import time

import pytest
from prometheus_client import CollectorRegistry
from tandem.metrics import EngineMetrics, MetricsPublisher, SchedulerStats, StatsSender, validate_endpoint

from tests.support.ports import free_port

L = {"model_name": "demo", "engine_type": "decode", "tp_rank": "0", "pp_rank": "0", "worker_id": "d0"}


def _wait(cond, budget_iters=400, step=0.025):
    """Poll until cond() is true; returns the final value (no timing assertions)."""
    for _ in range(budget_iters):
        if cond():
            return True
        time.sleep(step)
    return cond()


def _metrics():
    reg = CollectorRegistry()
    return reg, EngineMetrics(reg, model_name="demo", engine_type="decode", worker_id="d0")


def _free_tcp_port():
    return free_port()


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request, tmp_path):
    if request.param == "ipc":
        return f"ipc://{tmp_path}/stats.sock"
    return f"tcp://127.0.0.1:{_free_tcp_port()}"


def _send_until(sender, pub, stats, want):
    """Keep sending until the publisher has received `want` messages (the first sends may drop
    while the connection is being set up: that is the non-blocking contract)."""
    def step():
        if pub.received < want:
            sender.send(stats)
        return pub.received >= want
    return _wait(step)


def test_delivery_updates_metrics(endpoint):
    reg, em = _metrics()
    with MetricsPublisher(endpoint, em) as pub, StatsSender(endpoint) as sender:
        assert _send_until(sender, pub, SchedulerStats(num_running_reqs=5), 1)
        # once connected, counter deltas arrive exactly
        for _ in range(10):
            assert sender.send(SchedulerStats(prompt_tokens=3))
        assert _wait(lambda: reg.get_sample_value("sglang:prompt_tokens_total", L) == 30)
        assert reg.get_sample_value("sglang:num_running_reqs", L) == 5
        assert pub.bad_messages == 0


def test_publisher_restart_sender_keeps_sending(endpoint):
    reg, em = _metrics()
    sender = StatsSender(endpoint)
    pub = MetricsPublisher(endpoint, em).start()
    assert _send_until(sender, pub, SchedulerStats(num_running_reqs=1), 1)
    pub.stop()
    # publisher down: sends never raise or block; they are dropped or queued
    for _ in range(50):
        sender.send(SchedulerStats(num_running_reqs=2))
    pub2 = MetricsPublisher(endpoint, em).start()
    try:
        assert _send_until(sender, pub2, SchedulerStats(num_running_reqs=7), 1)

        def seven():  # messages queued before the restart may arrive first; later ones win
            sender.send(SchedulerStats(num_running_reqs=7))
            return reg.get_sample_value("sglang:num_running_reqs", L) == 7
        assert _wait(seven)
        assert pub2.bad_messages == 0
    finally:
        pub2.stop()
        sender.close()


def test_stalled_publisher_never_blocks_sender(tmp_path):
    """A bound PULL socket that nobody reads: 100k sends return and most are dropped."""
    import zmq

    endpoint = f"ipc://{tmp_path}/stalled.sock"
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.PULL)
    stalled.setsockopt(zmq.RCVHWM, 10)
    stalled.bind(endpoint)
    sender = StatsSender(endpoint, hwm=8)
    try:
        _wait(lambda: sender.send(SchedulerStats(num_running_reqs=1)))  # connected
        stats = SchedulerStats(num_running_reqs=1, itl_s=[0.01] * 64)
        n = 100_000
        for _ in range(n):
            sender.send(stats)
        assert sender.sent + sender.dropped >= n
        assert sender.dropped > n // 2
    finally:
        sender.close()
        stalled.close(linger=0)
        ctx.term()


def test_no_publisher_at_all_drops_without_blocking(tmp_path):
    sender = StatsSender(f"ipc://{tmp_path}/nobody.sock")
    for _ in range(1000):
        assert sender.send(SchedulerStats(num_running_reqs=1)) is False
    assert sender.dropped == 1000 and sender.sent == 0
    sender.close()
    assert sender.send(SchedulerStats()) is False  # after close: still no exception


def test_bad_message_is_counted_and_publisher_survives(tmp_path):
    import zmq

    reg, em = _metrics()
    endpoint = f"ipc://{tmp_path}/bad.sock"
    with MetricsPublisher(endpoint, em) as pub:
        ctx = zmq.Context()
        raw = ctx.socket(zmq.PUSH)
        raw.connect(endpoint)
        raw.send(b"not msgpack \xc1")
        assert _wait(lambda: pub.bad_messages == 1)
        raw.close(linger=0)
        ctx.term()
        sender = StatsSender(endpoint)
        assert _send_until(sender, pub, SchedulerStats(num_queue_reqs=3), 1)
        assert reg.get_sample_value("sglang:num_queue_reqs", L) == 3
        sender.close()


def test_publisher_bind_error_is_clear(tmp_path):
    _, em = _metrics()
    endpoint = f"tcp://127.0.0.1:{_free_tcp_port()}"
    with MetricsPublisher(endpoint, em):
        with pytest.raises(RuntimeError, match="cannot bind"):
            MetricsPublisher(endpoint, em).start()


@pytest.mark.parametrize("bad", ["", "inproc://x", "tcp://127.0.0.1", "tcp://:80", "tcp://h:99999",
                                 "ipc://", "ipc://" + "x" * 200])
def test_endpoint_validation(bad):
    with pytest.raises(ValueError, match="endpoint"):
        validate_endpoint(bad)


def test_ipc_file_removed_on_stop(tmp_path):
    _, em = _metrics()
    path = tmp_path / "gone.sock"
    pub = MetricsPublisher(f"ipc://{path}", em).start()
    assert os.path.exists(path)
    pub.stop()
    assert not os.path.exists(path)
