"""A real Prometheus scrapes tandem metrics and its HTTP API returns the series.

By default the targets are two small HTTP servers started here: a "decode" worker whose
engine metrics arrive through the real path (StatsSender -> ZMQ -> MetricsPublisher ->
registry) and a "router" exposing FrontendMetrics/RouterMetrics. To point the same test at
a running stack, set TANDEM_PROMETHEUS_TARGETS to a JSON map, e.g.
'{"router": ["127.0.0.1:8051"], "decode": ["127.0.0.1:8071"]}'.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry
from tandem.metrics import (
    ComponentMetrics,
    EngineMetrics,
    FrontendMetrics,
    MetricsPublisher,
    RouterMetrics,
    SchedulerStats,
    StatsSender,
    metrics_text,
)
from tandem.metrics.prometheus_config import render_prometheus_config

from tests.support.ports import free_port
from tests.support.system_tools import ensure_tool

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _free_port():
    return free_port()


def _serve(registry):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            body, ctype = metrics_text(registry)
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def _poll(fn, iters=240, step=0.25):
    """Call fn until it returns a truthy value (bounded by an iteration count)."""
    for _ in range(iters):
        try:
            v = fn()
        except OSError:
            v = None
        if v:
            return v
        time.sleep(step)
    return None


@pytest.fixture
def local_stack(tmp_path):
    """Worker + router metric servers fed through the real publisher path."""
    worker_reg = CollectorRegistry()
    em = EngineMetrics(worker_reg, model_name="demo", engine_type="decode", worker_id="d0")
    cm = ComponentMetrics(worker_reg, component="decode", endpoint="generate", model="demo", worker_id="d0")
    endpoint = f"ipc://{tmp_path}/stats.sock"
    pub = MetricsPublisher(endpoint, em, component_metrics=cm).start()
    sender = StatsSender(endpoint)
    stop = threading.Event()

    def scheduler_loop():  # what the engine does: one message per iteration
        while not stop.is_set():
            s = SchedulerStats(num_running_reqs=4, num_queue_reqs=1, num_used_tokens=64, max_total_num_tokens=1024,
                               token_usage=64 / 1024, gen_throughput=12.5, cache_hit_rate=0.5, page_size=16,
                               prompt_tokens=8, generation_tokens=2)
            s.add_finished(e2e=0.9, ttft=0.2, queue_time=0.01, itl=[0.02, 0.03])
            sender.send(s)
            with cm.track_request() as t:
                t.first_response()
            stop.wait(0.1)

    loop = threading.Thread(target=scheduler_loop, daemon=True)
    loop.start()

    router_reg = CollectorRegistry()
    fm = FrontendMetrics(router_reg, model="demo")
    rm = RouterMetrics(router_reg, model="demo")
    fm.set_model_info(context_length=2048, kv_cache_block_size=16, total_kv_blocks=64)
    for _ in range(3):
        with fm.track_request("chat_completions", "stream") as r:
            r.set_input_tokens(12)
            r.on_tokens(1)
            r.on_tokens(1)
        rm.record_decision(worker_id="d0", policy="round_robin", overlap_blocks=0)
        rm.observe_overhead_ms(total=0.2)

    worker_srv, router_srv = _serve(worker_reg), _serve(router_reg)
    yield {"decode": [f"127.0.0.1:{worker_srv.server_port}"], "router": [f"127.0.0.1:{router_srv.server_port}"]}
    stop.set()
    loop.join(5)
    sender.close()
    pub.stop()
    worker_srv.shutdown()
    router_srv.shutdown()


@pytest.fixture
def targets(request):
    env = os.environ.get("TANDEM_PROMETHEUS_TARGETS")
    if env:
        return json.loads(env)
    return request.getfixturevalue("local_stack")


def test_real_prometheus_scrapes_engine_and_frontend_series(tmp_path, targets):
    binary = ensure_tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus_config(targets, "1s"))
    port = _free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def series(expr):
            def check():
                body = _query(port, expr)
                return body["data"]["result"] if body["status"] == "success" and body["data"]["result"] else None
            return check

        running = _poll(series("sglang:num_running_reqs"))
        assert running, f"no sglang:num_running_reqs; log: {(tmp_path / 'prometheus.log').read_text()[-2000:]}"
        requests = _poll(series("dynamo_frontend_requests_total"))
        assert requests, "no dynamo_frontend_requests_total series"

        def all_up():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as r:
                active = json.load(r)["data"]["activeTargets"]
            n = sum(len(v) for v in targets.values())
            return len(active) == n and all(t["health"] == "up" for t in active)
        assert _poll(all_up), "not every target is up"

        if not os.environ.get("TANDEM_PROMETHEUS_TARGETS"):  # values we know we sent
            assert float(running[0]["value"][1]) == 4
            assert running[0]["metric"]["worker_id"] == "d0" and running[0]["metric"]["engine_type"] == "decode"
            assert float(requests[0]["value"][1]) == 3
            assert _poll(series("sglang:time_to_first_token_seconds_bucket"))
            assert _poll(series("dynamo_component_total_blocks == 64"))

        # every dashboard query is accepted by the real Prometheus
        with open(os.path.join(ROOT, "deploy", "observability", "grafana", "dashboards", "tandem.json")) as f:
            dash = json.load(f)
        for p in dash["panels"]:
            for t in p["targets"]:
                expr = t["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
                assert _query(port, expr)["status"] == "success", expr
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
