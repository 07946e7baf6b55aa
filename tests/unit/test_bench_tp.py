"""The TP benchmark helpers (engine_bench.py --tp-size, gpu_engine_check.py --tp-size) on CPU: the same
code path as on GPUs with gloo instead of NCCL, on the dense demo model in float32."""
from __future__ import annotations

import pytest
import torch

from benchmarks.common.tp import LOGPROB_TOL, compare_tp
from tests.support.models import demo_model

pytestmark = pytest.mark.timeout(240)


def test_compare_tp_runs_both_sides_and_matches():
    torch.set_num_threads(1)
    ids = [[5, 17, 301, 2000, 44, 9, 77, 1234], [8000, 3, 3, 610]]
    r = compare_tp(demo_model("tandem-demo-dense"), "cpu", "float32", 2, ["The license", "import os\n"], 4,
                   bench_prompts={2: ids}, bench_out_len=3, num_threads=1, max_total_tokens=512)
    assert r["match"]["requests"] == 2 and r["match"]["tokens_equal"] == 2
    assert r["match"]["max_logprob_diff"] <= LOGPROB_TOL
    one, two = r["sides"]["1"], r["sides"]["2"]
    assert (one["engine"]["kv_heads_per_rank"], two["engine"]["kv_heads_per_rank"]) == (2, 1)
    assert two["engine"]["param_bytes_rank0"] < 0.6 * one["engine"]["param_bytes_rank0"]
    assert two["engine"]["overlap_schedule"] is True  # rank 0 shares the tokens being sampled
    assert one["tok_s"][2] > 0 and two["tok_s"][2] > 0
