"""EPLB through real processes: a MoE worker reports expert load to the planner, applies
the plans it pushes while requests run, and its greedy tokens do not change; with the planner
gone it keeps its placement and serves on."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from tests.support.clients import generate, generate_many, pages_in_use, sampling
from tests.support.procs import start_service

MOE = "models/tandem-demo-moe"


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body or {}).encode() if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


PROMPTS = [[(7 * i + 13 * j) % 900 + 20 for j in range(24 + 5 * i)] for i in range(6)]


def test_worker_applies_planner_plans_while_serving_and_tokens_do_not_change():
    planner = start_service("tandem.eplb_planner", "--model-path", MOE, "--ep-size", "2", "--ep-num-redundant-experts", "2",
                            "--eplb-rebalance-num-iterations", "30")
    worker = start_service("tandem.decode", "--model-path", MOE, "--max-total-tokens", "8192", "--enable-eplb",
                           "--ep-size", "2", "--ep-num-redundant-experts", "2",
                           "--eplb-planner-address", planner.grpc_address)
    reference = start_service("tandem.decode", "--model-path", MOE, "--max-total-tokens", "8192", "--skip-warmup")
    status_url = f"http://{worker.system_address}/eplb/status"
    try:
        # Tokens with the checkpoint's own expert layout, from a worker without EPLB.
        before = [generate(reference.grpc_address, p, sampling(max_tokens=10))[0] for p in PROMPTS]
        # Keep requests running while the planner's plan arrives and is applied.
        stop = threading.Event()
        errors: list[BaseException] = []

        def load():
            while not stop.is_set():
                try:
                    generate_many(worker.grpc_address, PROMPTS, [sampling(max_tokens=16)] * len(PROMPTS), 6)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        t = threading.Thread(target=load)
        t.start()
        deadline = time.monotonic() + 120
        status = {}
        while time.monotonic() < deadline:
            status = http("GET", status_url)[1]
            if status["plan_version"] >= 1:
                break
            time.sleep(0.5)
        stop.set()
        t.join(120)
        assert not errors, errors
        assert status["plan_version"] >= 1, f"no plan applied: {status}"
        assert status["physical_to_logical"] != [list(range(8)) + [0, 1]] * status["num_layers"]
        after = [generate(worker.grpc_address, p, sampling(max_tokens=10))[0] for p in PROMPTS]
        assert after == before
        assert pages_in_use(worker.grpc_address) == 0
        # Planner down: the worker keeps its placement and serves on, the same tokens.
        placed = http("GET", status_url)[1]
        planner.kill()
        time.sleep(2.0)  # several report intervals with the planner gone
        again = [generate(worker.grpc_address, p, sampling(max_tokens=10))[0] for p in PROMPTS]
        assert again == before
        kept = http("GET", status_url)[1]
        assert (kept["plan_version"], kept["physical_to_logical"]) == (placed["plan_version"],
                                                                        placed["physical_to_logical"])
        assert worker.proc.poll() is None
        assert pages_in_use(worker.grpc_address) == 0
    finally:
        worker.stop()
        planner.stop()
        reference.stop()


@pytest.mark.parametrize("mode", ["per_token", "per_pass", "stat", "stat_approx"])
def test_recorder_modes_over_http(mode, tmp_path):
    worker = start_service("tandem.decode", "--model-path", MOE, "--max-total-tokens", "4096",
                           "--expert-distribution-recorder-mode", mode, "--skip-warmup")
    base = f"http://{worker.system_address}"
    try:
        assert http("POST", f"{base}/start_expert_distribution_record")[0] == 200
        tokens, _ = generate(worker.grpc_address, PROMPTS[0], sampling(max_tokens=5))
        assert http("POST", f"{base}/stop_expert_distribution_record")[0] == 200
        code, body = http("POST", f"{base}/dump_expert_distribution_record", {"output_dir": str(tmp_path)})
        assert code == 200, body
        dump = json.loads(open(body["path"]).read())
        assert dump["mode"] == mode
        # Every token of the prompt and of each decode step was routed to top-k experts in every layer.
        num_tokens = len(PROMPTS[0]) + len(tokens) - 1
        counts = dump["logical_count"]
        assert len(counts) == dump["num_layers"] and len(counts[0]) == dump["num_logical_experts"]
        k = sum(counts[0]) // num_tokens
        assert k >= 1 and all(sum(row) == k * num_tokens for row in counts)
        if mode == "per_token":
            assert sum(len(r["positions"]) for r in dump["records"] if r["layer"] == 0) == num_tokens
        if mode == "per_pass":
            assert len(dump["records"]) == dump["num_forward_passes"] >= len(tokens)
        code, bad = http("POST", f"{base}/dump_expert_distribution_record", {"format": "xml"})
        assert code == 400 and "format" in bad["error"]
    finally:
        worker.stop()


def test_worker_with_two_ep_ranks_gives_the_tokens_of_one_rank():
    common = ["--model-path", MOE, "--max-total-tokens", "4096", "--torch-num-threads", "1", "--skip-warmup"]
    one = start_service("tandem.decode", *common)
    two = start_service("tandem.decode", *common, "--ep-size", "2", "--enable-eplb", "--ep-num-redundant-experts", "2")
    try:
        params = [sampling(max_tokens=8)] * len(PROMPTS)
        assert generate_many(two.grpc_address, PROMPTS, params, 4) == generate_many(one.grpc_address, PROMPTS, params, 4)
        assert http("GET", f"http://{two.system_address}/eplb/status")[1]["num_physical_experts"] == 10
        assert pages_in_use(two.grpc_address) == 0
    finally:
        assert two.stop() == 0, two.log()
        one.stop()
