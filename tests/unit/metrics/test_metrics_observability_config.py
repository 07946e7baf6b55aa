"""prometheus.yml generator, checked-in configs, Grafana dashboard: validated with promtool."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from tandem.metrics.definitions import all_specs
from tandem.metrics.prometheus_config import DEFAULT_TARGETS, main, render_prometheus_config

from tests.support.system_tools import ensure_tool

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
OBS = os.path.join(ROOT, "deploy", "observability")


def _promtool(*args):
    return subprocess.run([ensure_tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_render_structure():
    text = render_prometheus_config({"router": ["127.0.0.1:8051"], "decode": ["127.0.0.1:8071", "h2:8072"]}, 1)
    cfg = yaml.safe_load(text)
    assert cfg["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s"}
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in cfg["scrape_configs"]}
    assert jobs == {"router": ["127.0.0.1:8051"], "decode": ["127.0.0.1:8071", "h2:8072"]}
    assert yaml.safe_load(render_prometheus_config({"r": ["a:1"]}, 0.5))["global"]["scrape_interval"] == "500ms"


@pytest.mark.parametrize("targets,interval,msg", [
    ({}, "10s", "at least one job"),
    ({"router": []}, "10s", "non-empty list"),
    ({"router": "a:1"}, "10s", "non-empty list"),
    ({"router": ["localhost"]}, "10s", "host:port"),
    ({"router": ["h:0"]}, "10s", "host:port"),
    ({"bad job": ["h:1"]}, "10s", "job name"),
    ({"router": ["h:1"]}, "10 seconds", "duration"),
    ({"router": ["h:1"]}, 0, "> 0"),
])
def test_render_rejects_bad_input(targets, interval, msg):
    with pytest.raises(ValueError, match=msg):
        render_prometheus_config(targets, interval)


def test_checked_in_prometheus_yml_is_the_generated_default():
    with open(os.path.join(OBS, "prometheus.yml")) as f:
        assert f.read() == render_prometheus_config(DEFAULT_TARGETS, "10s")


def test_promtool_accepts_generated_and_checked_in(tmp_path):
    out = tmp_path / "prometheus.yml"
    assert main(["--job", "router=127.0.0.1:8051", "--job", "decode=127.0.0.1:8071,127.0.0.1:8072",
                 "--scrape-interval", "1s", "-o", str(out)]) == 0
    for path in (str(out), os.path.join(OBS, "prometheus.yml")):
        r = _promtool("check", "config", path)
        assert r.returncode == 0, r.stdout + r.stderr


def _dashboard():
    with open(os.path.join(OBS, "grafana", "dashboards", "tandem.json")) as f:
        return json.load(f)


def _exprs(dash):
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_is_current_and_references_only_known_metrics():
    r = subprocess.run([sys.executable, "-c",
                        "import json,runpy; m=runpy.run_path('deploy/observability/grafana/make_dashboard.py');"
                        "print(json.dumps(m['dashboard']()))"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == _dashboard(), "tandem.json is stale: run make_dashboard.py"
    dash = _dashboard()
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for want in ("e2e", "time to first token", "inter-token", "throughput", "running & queued", "request rate",
                 "prefix cache hit", "kv cache usage", "kv pool", "transfer speed", "transfer latency",
                 "transfer failures", "router decisions"):
        assert want in titles, want
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    known = {s.name for s in all_specs()} | {"sglang:eplb_gpu_physical_count"}
    for expr in _exprs(dash):
        names = re.findall(r"\b((?:sglang:|dynamo_|tandem_)[a-z0-9_:]+?)(?:_bucket)?\{", expr)
        assert names, expr
        for name in names:
            assert name in known, f"{name} in {expr!r} is not a tandem metric"
    for expr in _exprs(dash):
        if "histogram_quantile" in expr:
            assert re.search(r"sum by \(le\) \(rate\([a-z0-9_:]+_bucket\{", expr), expr


def test_dashboard_promql_parses(tmp_path):
    """Every panel query as a recording rule: `promtool check rules` parses the PromQL."""
    rules = []
    for i, expr in enumerate(_exprs(_dashboard())):
        expr = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        rules.append({"record": f"tandem:panel_query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


def test_grafana_provisioning_files():
    with open(os.path.join(OBS, "grafana", "provisioning", "datasources", "datasource.yml")) as f:
        ds = yaml.safe_load(f)
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["uid"] == _dashboard()["panels"][0]["datasource"]["uid"]
    with open(os.path.join(OBS, "grafana", "provisioning", "dashboards", "dashboards.yml")) as f:
        prov = yaml.safe_load(f)
    assert prov["providers"][0]["type"] == "file"
