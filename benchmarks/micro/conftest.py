"""Micro-benchmarks (pytest-benchmark) of the router's and the config's hot paths.

    make bench-micro      # runs them, saves the results in .benchmarks/ and compares them
                          # with the previous saved run on this machine

Inputs are fixed (seeded), so two runs measure the same work.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_DENSE = REPO / "models" / "tandem-demo-dense"


@pytest.fixture(scope="session")
def rng() -> random.Random:
    return random.Random(0)


@pytest.fixture(scope="session")
def prompt(rng) -> list[int]:
    return [rng.randrange(10, 30000) for _ in range(2048)]


@pytest.fixture(scope="session")
def demo_tokenizer():
    if not DEMO_DENSE.is_dir():
        raise RuntimeError(f"{DEMO_DENSE} missing: run `make demo-models` (make bench-micro does)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_DENSE))
