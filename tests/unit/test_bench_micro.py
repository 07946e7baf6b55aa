"""`make bench-micro` keeps working: every micro-benchmark runs (once, timing off) and checks its result."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_micro_benchmarks_run():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "benchmarks/micro", "--benchmark-disable"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "9 passed" in proc.stdout
