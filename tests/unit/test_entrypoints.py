"""The one table of services -> modules (deploy/services.py) and the start-command check that
validate_deploy.py runs over the images, compose and Kubernetes (build-support/entrypoints_check.py)."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "build-support"))
import entrypoints_check as ec  # noqa: E402

from deploy.services import module_of, service_modules, service_of_module  # noqa: E402


def test_every_service_folder_is_in_the_table_and_its_module_has_a_main():
    folders = sorted(p.name for p in (REPO / "services").iterdir() if (p / "BUILD").exists())
    assert sorted(service_modules()) == folders
    for svc in folders:
        calls = [n for n in ast.walk(ast.parse((REPO / "services" / svc / "BUILD").read_text()))
                 if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "tandem_service"]
        # The BUILD file names only the service: its module comes from the table.
        assert [([a.value for a in c.args], c.keywords) for c in calls] == [([svc], [])]
        assert importlib.util.find_spec(module_of(svc) + ".__main__") is not None, svc
        assert service_of_module(module_of(svc)) == svc
    assert module_of("eplb") == "tandem.eplb_planner"
    with pytest.raises(ValueError, match="unknown service 'nope'"):
        module_of("nope")


@pytest.mark.parametrize("image,svc", [("localhost/tandem/decode:0.1.0-cuda", "decode"), ("tandem/eplb", "eplb"),
                                       ("localhost/tandem/router:0.1.0", "router"), ("docker.io/prom/prometheus", None),
                                       ("quay.io/coreos/etcd:v3.5.17", None), ("tandem/unknown", None)])
def test_image_service(image, svc):
    assert ec.image_service(image) == svc


def test_command_modules_in_argv_and_in_a_shell_script():
    assert ec.command_modules(["/opt/tandem/venv/bin/python", "-m", "tandem.decode"]) == ["tandem.decode"]
    assert ec.command_modules(["/bin/sh", "-c", 'ulimit -l unlimited && exec /opt/x/bin/python3 -m tandem.prefill "$@"',
                               "tandem-prefill"]) == ["tandem.prefill"]
    assert ec.command_modules(["/usr/bin/prometheus"]) == []


def fake_help(flags):
    text = "usage: python -m m " + " ".join(f"[{f} X]" for f in flags)
    return lambda module: text


def test_check_start_accepts_known_flags_and_refuses_the_rest():
    help_of = fake_help(["--config", "--page-size"])
    assert ec.check_start("t", "tandem/decode", None, ["--config", "/etc/tandem/decode.yaml"], help_of) == "decode"
    with pytest.raises(ec.EntrypointError, match="has no flag --bogus"):
        ec.check_start("t", "tandem/decode", None, ["--config", "x", "--bogus", "1"], help_of)
    with pytest.raises(ec.EntrypointError, match="does not parse"):  # --page-size needs its value
        ec.check_start("t", "tandem/decode", None, ["--config", "x", "--page-size"], help_of)
    with pytest.raises(ec.EntrypointError, match="not one of tandem's"):
        ec.check_start("t", "tandem/nope", None, [], help_of)


def test_check_start_refuses_a_command_that_runs_another_module_or_drops_the_args():
    help_of = fake_help(["--config"])
    # The bug this check exists for: the EPLB image ran `python -m tandem.eplb`.
    with pytest.raises(ec.EntrypointError, match="the eplb image's module is tandem.eplb_planner"):
        ec.check_start("t", "tandem/eplb", ["/opt/tandem/venv/bin/python", "-m", "tandem.eplb"], [], help_of)
    with pytest.raises(ec.EntrypointError, match="drops the args"):
        ec.check_start("t", "tandem/prefill", ["/bin/sh", "-c", "exec python -m tandem.prefill", "x"],
                       ["--config", "c"], help_of)
    ok = ["/bin/sh", "-c", 'exec python -m tandem.prefill "$@"', "x"]
    assert ec.check_start("t", "tandem/prefill", ok, ["--config", "c"], help_of) == "prefill"


def test_help_of_a_package_without_main_fails():
    with pytest.raises(ec.EntrypointError, match=r"python -m tandem.eplb --help` exited"):
        ec.HelpTexts()("tandem.eplb")


def test_compose_and_k8s_walk_every_tandem_container():
    help_of = fake_help(["--config"])
    compose = {"services": {"eplb": {"image": "localhost/tandem/eplb:${TANDEM_VERSION:-0.1.0}",
                                     "command": ["--config", "/etc/tandem/eplb.yaml"]},
                            "prometheus": {"image": "${PROMETHEUS_IMAGE:-localhost/tandem/prometheus:0.1.0}"}}}
    assert ec.check_compose(compose, help_of) == ["compose:eplb"]
    compose["services"]["eplb"]["command"] = ["--config", "x", "--eplb-bogus", "1"]
    with pytest.raises(ec.EntrypointError, match="service eplb.*no flag --eplb-bogus"):
        ec.check_compose(compose, help_of)
    dep = {"kind": "Deployment", "metadata": {"name": "prefill"}, "spec": {"template": {"spec": {"containers": [
        {"name": "prefill", "image": "localhost/tandem/prefill:0.1.0-cuda", "args": ["--config", "c"],
         "command": ["/bin/sh", "-c", 'exec /opt/tandem/venv/bin/python -m tandem.decode "$@"', "p"]}]}}}}
    with pytest.raises(ec.EntrypointError, match="runs \\['tandem.decode'\\]"):
        ec.check_k8s("gpu", [dep], help_of)
