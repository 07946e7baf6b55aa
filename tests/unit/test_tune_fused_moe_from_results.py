"""The committed fused-MoE config file of a GPU is what ``tune_fused_moe.py --from-results`` writes
from the tuning run's own results JSON (the file itself did not come back from the device)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tandem.engine.kernels import fused_moe

from benchmarks import tune_fused_moe

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "gpu" / "tune_fused_moe_h100.json"
COMMITTED = Path(fused_moe.CONFIG_DIR) / "fused_moe_NVIDIA_H100_80GB_HBM3.json"


def test_committed_h100_configs_are_the_tuning_runs_winners(tmp_path, monkeypatch):
    monkeypatch.setattr(fused_moe, "CONFIG_DIR", str(tmp_path))
    assert tune_fused_moe.main(["--from-results", str(RESULTS)]) == 0
    written = json.loads((tmp_path / COMMITTED.name).read_text())
    committed = json.loads(COMMITTED.read_text())
    assert written["configs"] == committed["configs"]
    results = json.loads(RESULTS.read_text())
    assert committed["commit"] == results["git"]["commit"] and committed["device"] == results["device_name"]
    # every tuned (shape, batch) of the run is in the file, under the key the engine looks up
    for row in results["rows"]:
        m = tune_fused_moe.moe_shape(row["shape"])
        key = fused_moe.shape_key(m["k"] + m["S"], m["H"], m["inter"], torch.bfloat16)
        assert committed["configs"][key][str(row["batch"])] == row["config"]
