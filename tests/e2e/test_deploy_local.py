"""`make deploy-local` end to end: the stack comes up, answers a chat completion through the
router, Prometheus scrapes every target, and stopping leaves no process behind."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.procs import REPO

STACK = REPO / "deploy" / "local" / "stack.yaml"


def free_base(span: int = 100) -> int:
    """A port base where base..base+span are free (best effort). Below the kernel's ephemeral
    range (32768+), from which other tests' port-0 servers and every client connection draw."""
    for _ in range(50):
        base = random.randrange(20000, 32700 - span, 100)
        try:
            for port in range(base, base + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def write_stack(tmp_path: Path, mode: str, model: str | None = None) -> Path:
    cfg = yaml.safe_load(STACK.read_text())
    if model:
        cfg["model_path"] = model
    base = free_base()
    for i, key in enumerate(cfg["ports"]):
        cfg["ports"][key] = base + 10 * i
    cfg["mode"] = mode
    cfg["scrape_interval"] = "1s"
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def start_stack(tmp_path: Path, mode: str, model: str | None = None, tls: bool = False):
    stack = write_stack(tmp_path, mode, model)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MODE", "MODEL", "PREFILL", "DECODE", "TLS")}
    if tls:
        env["TLS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.local.run", "--stack", str(stack), "--run-dir",
                             str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    output = "".join(lines)
    assert "all healthy" in output, output
    cfg = yaml.safe_load(stack.read_text())
    return proc, cfg, run_dir, output


@pytest.mark.parametrize("mode,model", [
    ("disagg", None),
    ("disagg", "models/tandem-demo-moe"),  # MoE: the EPLB planner joins the stack
    pytest.param("agg", None, marks=pytest.mark.slow),
])
def test_deploy_local_serves_chat_scrapes_metrics_and_stops_clean(tmp_path, mode, model):
    from openai import OpenAI

    proc, cfg, run_dir, output = start_stack(tmp_path, mode, model)
    pids = json.loads((run_dir / "pids.json").read_text())
    try:
        ports = cfg["ports"]
        assert f"http://127.0.0.1:{ports['router_http']}/v1" in output and "curl -s" in output
        client = OpenAI(base_url=f"http://127.0.0.1:{ports['router_http']}/v1", api_key="none")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                               max_tokens=8)
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0
        prom = f"http://127.0.0.1:{ports['prometheus']}"
        expected_jobs = {"tandem-router", "tandem-decode"} | ({"tandem-prefill"} if mode == "disagg" else set())
        if model and "moe" in model:
            expected_jobs.add("tandem-eplb")
            assert "eplb" in pids
        deadline = time.monotonic() + 60
        while True:
            targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
            up = {t["labels"]["job"] for t in targets if t["health"] == "up"}
            series = {}
            for name in ("sglang:num_running_reqs", "dynamo_frontend_requests_total"):
                q = urllib.parse.urlencode({"match[]": name})
                series[name] = get_json(f"{prom}/api/v1/series?{q}")["data"]
            if (up >= expected_jobs and all(series.values())) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert up >= expected_jobs, targets
        assert all(series.values()), series
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name, p in pids.items() if alive(p)]


def test_deploy_local_tls_runs_every_hop_over_mtls(tmp_path):
    """TLS=1: router -> decode -> prefill, workers -> planner and Prometheus's scrapes all over
    mTLS with the generated CA; plaintext and certificate-less clients are refused."""
    import httpx
    from openai import OpenAI
    from tandem.server.tls import TlsFiles

    from tests.support.pki import client_context

    proc, cfg, run_dir, output = start_stack(tmp_path, "disagg", "models/tandem-demo-moe", tls=True)
    try:
        ports, tls_dir = cfg["ports"], run_dir / "tls"
        client = TlsFiles(str(tls_dir / "client.pem"), str(tls_dir / "client-key.pem"), str(tls_dir / "ca.pem"))
        base = f"https://127.0.0.1:{ports['router_http']}/v1"
        assert base in output and "--cacert" in output
        http = httpx.Client(verify=client_context(client), timeout=60)
        oa = OpenAI(base_url=base, api_key="none", http_client=http)
        model = oa.models.list().data[0].id
        reply = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=8)
        assert reply.usage.completion_tokens > 0  # through decode and prefill (remote prefill, NIXL)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{ports['router_http']}/v1/models", timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/models", verify=client_context(None, client.ca_certs), timeout=5)
        for name in ("router", "decode-0", "prefill-0", "eplb"):
            assert "(TLS)" in (run_dir / "logs" / f"{name}.log").read_text(), name
        prom = f"http://127.0.0.1:{ports['prometheus']}"
        jobs = {"tandem-router", "tandem-decode", "tandem-prefill", "tandem-eplb"}
        deadline = time.monotonic() + 60
        while True:
            targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
            up = {t["labels"]["job"] for t in targets if t["health"] == "up" and t["scrapeUrl"].startswith("https")}
            q = urllib.parse.urlencode({"query": 'tandem_eplb_load_reports_total{result="accepted"} > 0'})
            reports = get_json(f"{prom}/api/v1/query?{q}")["data"]["result"]
            if (up >= jobs and reports) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert up >= jobs, targets
        assert reports, "the planner got no load report over mTLS"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def test_stop_local_stops_a_running_stack(tmp_path):
    proc, _cfg, run_dir, _ = start_stack(tmp_path, "agg")
    pids = json.loads((run_dir / "pids.json").read_text())
    out = subprocess.run([sys.executable, "-m", "deploy.local.run", "--stop", "--run-dir", str(run_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert "stopped:" in out.stdout
    # A requested stop is not a crash: the foreground run stops its stack, says so, exits 0.
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopped" in rest.splitlines()[-1] and "exited; see" not in rest, rest
    assert not [name for name, p in pids.items() if alive(p)]


def test_full_stack_without_prometheus_installed_fails_plainly(tmp_path, monkeypatch, capsys):
    from deploy.local import run

    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus on PATH
    stack = write_stack(tmp_path, "disagg")
    assert run.main(["--stack", str(stack), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Prometheus is not installed" in err and "install-prometheus.sh" in err
    assert not (tmp_path / "run").exists(), "nothing may start without the Prometheus that was asked for"
