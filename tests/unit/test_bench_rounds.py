"""The alternating rounds the engine benchmarks judge their gates on (benchmarks/common/engine.py):
every side once a round, the first side rotating; medians with their spread; per-round ratios."""
from __future__ import annotations

from benchmarks.common.engine import alternate_rounds, round_ratios, spread


def test_rounds_rotate_the_order_and_keep_each_sides_values():
    order = []

    def side(name, values):
        it = iter(values)

        def measure():
            order.append(name)
            return next(it)
        return measure

    got = alternate_rounds({"a": side("a", [1, 2, 3]), "b": side("b", [10, 20, 30]), "c": side("c", [5, 6, 7])}, 3)
    assert got == {"a": [1, 2, 3], "b": [10, 20, 30], "c": [5, 6, 7]}
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_spread_and_ratios_are_per_round_medians():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": 3, "all": [3.0, 1.0, 2.0]}
    assert spread([1.0, 4.0])["median"] == 2.5
    r = round_ratios([2.0, 9.0, 3.0], [1.0, 3.0, 1.0])  # per round 2, 3, 3: median 3, not 14/5
    assert (r["median"], r["min"], r["max"]) == (3.0, 2.0, 3.0)
