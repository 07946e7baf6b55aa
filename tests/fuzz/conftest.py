"""Fuzzing fixtures: case counters printed at the end of the session (`make test` shows them)."""
from __future__ import annotations

from collections import Counter

import pytest

CASES: Counter[str] = Counter()


@pytest.fixture(scope="session")
def cases() -> Counter[str]:
    return CASES


def pytest_terminal_summary(terminalreporter):
    if CASES:
        terminalreporter.write_line("fuzz cases run: " + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())))
