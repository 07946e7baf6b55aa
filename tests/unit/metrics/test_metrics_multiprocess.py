"""PROMETHEUS_MULTIPROC_DIR: two worker processes write, one exposition merges them."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

WRITER = textwrap.dedent("""
    import sys
    from tandem.metrics import EngineMetrics, ComponentMetrics, SchedulerStats, make_registry
    reg = make_registry()
    em = EngineMetrics(reg, model_name="demo", engine_type="decode", worker_id=sys.argv[1])
    em.apply(SchedulerStats(num_running_reqs=int(sys.argv[2]), prompt_tokens=int(sys.argv[2])))
    em.apply(SchedulerStats(num_running_reqs=int(sys.argv[2]) + 1))  # mostrecent: the last set wins
    cm = ComponentMetrics(reg, component="decode", endpoint="generate", model="demo", worker_id="shared")
    with cm.track_request():
        pass
""")
READER = textwrap.dedent("""
    from tandem.metrics import make_registry, metrics_text, is_multiprocess
    reg = make_registry()
    assert is_multiprocess(reg)
    body, ctype = metrics_text(reg)
    print(ctype)
    print(body.decode())
""")
LATE = textwrap.dedent("""
    import os
    import prometheus_client
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["LATE_DIR"]
    from tandem.metrics import make_registry
    make_registry()
""")


def _run(code, env, *args):
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)


def test_two_processes_merge_into_one_exposition(tmp_path):
    from tandem.metrics import prepare_multiproc_dir

    d = prepare_multiproc_dir(str(tmp_path / "mp"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
    for wid, n in (("d0", "3"), ("d1", "5")):
        r = _run(WRITER, env, wid, n)
        assert r.returncode == 0, r.stderr
    r = _run(READER, env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'sglang:num_running_reqs{engine_type="decode",model_name="demo",pp_rank="0",tp_rank="0",worker_id="d0"} 4.0' in out
    assert 'sglang:num_running_reqs{engine_type="decode",model_name="demo",pp_rank="0",tp_rank="0",worker_id="d1"} 6.0' in out
    assert 'sglang:prompt_tokens_total{engine_type="decode",model_name="demo",pp_rank="0",tp_rank="0",worker_id="d1"} 5.0' in out
    # a counter with identical labels in both processes is summed
    assert ('dynamo_component_requests_total{dynamo_component="decode",dynamo_endpoint="generate",'
            'dynamo_namespace="tandem",model="demo",worker_id="shared"} 2.0') in out


def test_env_set_after_import_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["LATE_DIR"] = str(tmp_path)
    r = _run(LATE, env)
    assert r.returncode != 0
    assert "set after prometheus_client was imported" in r.stderr


def test_single_process_registry_by_default(monkeypatch):
    from tandem.metrics import is_multiprocess, make_registry

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    assert not is_multiprocess(make_registry())
