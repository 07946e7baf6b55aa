"""The demo checkpoints the tests load (models/, built by `make demo-models`)."""
from __future__ import annotations

from tests.support.procs import REPO


def demo_model(name: str = "tandem-demo-dense") -> str:
    """Path of demo checkpoint `name`, built first (offline, deterministic) when missing."""
    from deploy.demo_models import SPECS, build_all, is_built

    path = REPO / "models" / name
    if not is_built(str(path), next(s for s in SPECS if s["name"] == name)):
        build_all(str(REPO / "models"), log=lambda *_: None)
    return str(path)
