"""The Debian-packaged tools some tests run (etcd, Prometheus, promtool): taken from PATH,
or installed on first use with the repo's installer (`make test` installs them all before
pytest starts). A tool that cannot be installed fails the test, naming the installer: a
missing tool is never a reason to skip."""
from __future__ import annotations

import shutil
import subprocess

from tests.support.procs import REPO

INSTALLERS = {
    "etcd": "build-support/install-etcd.sh",
    "prometheus": "build-support/install-prometheus.sh",
    "promtool": "build-support/install-prometheus.sh",
}


def ensure_tool(name: str) -> str:
    """Path of the `name` binary, installing it first when it is not on PATH."""
    path = shutil.which(name)
    if path:
        return path
    installer = INSTALLERS[name]
    res = subprocess.run(["bash", str(REPO / installer)], capture_output=True, text=True, timeout=900)
    path = shutil.which(name)
    if res.returncode != 0 or not path:
        raise RuntimeError(f"{name} is not installed and {installer} could not install it "
                           f"(exit {res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}")
    return path
