"""ExpertDistributionRecorder: each mode on a known input, dumps, control."""
import json

import pytest
import torch
from tandem.eplb.placement import ExpertLocation
from tandem.eplb.recorder import ExpertDistributionRecorder, load_dump

# Two passes over 2 layers, 4 experts, top-2.
PASSES = [
    {0: [[0, 1], [0, 2]], 1: [[3, 2], [3, 1]]},
    {0: [[1, 0]], 1: [[2, 3]]},
]
# expected logical counts per pass
COUNTS = [
    [[2, 1, 1, 0], [0, 1, 1, 2]],
    [[1, 1, 0, 0], [0, 0, 1, 1]],
]


def count(rec, layer, ids, phys=None, positions=None):
    """What the MoE routing does for the recorder: +1 per entry in the layer's counters."""
    counted = phys if rec.counts_physical else ids
    rec.counter(layer).scatter_add_(0, counted.reshape(-1), torch.ones(counted.numel(), dtype=torch.int32))
    rec.record_tokens(layer, ids, positions)


def run(rec, loc=None):
    for p in PASSES:
        for layer, ids in p.items():
            ids = torch.tensor(ids)
            phys = loc.dispatch(layer, ids, "static") if loc is not None else None
            count(rec, layer, ids, phys)
        rec.end_pass()


def make(mode, **kw):
    rec = ExpertDistributionRecorder(mode, num_layers=2, num_logical_experts=4, **kw)
    rec.start()
    return rec


def test_not_recording_until_started():
    rec = ExpertDistributionRecorder("stat", 2, 4)
    run(rec)
    assert rec.num_forward_passes == 0 and rec.logical_load().sum() == 0
    rec.start()
    run(rec)
    rec.stop()
    run(rec)
    assert rec.num_forward_passes == 2


def test_stat_window():
    rec = make("stat", buffer_size=8)
    run(rec)
    assert rec.logical_load().tolist() == (torch.tensor(COUNTS[0]) + torch.tensor(COUNTS[1])).tolist()
    d = rec.dump_dict()
    assert d["logical_count_per_pass"] == COUNTS
    assert d["num_forward_passes"] == 2


def test_stat_window_slides():
    rec = make("stat", buffer_size=1)
    run(rec)
    assert rec.logical_load().tolist() == COUNTS[1]  # only the newest pass is kept
    run(rec)  # passes 3 and 4; buffer 1 keeps pass 4 == COUNTS[1]
    assert rec.dump_dict()["logical_count_per_pass"] == [COUNTS[1]]


def test_stat_window_order_after_wrap():
    rec = make("stat", buffer_size=3)
    run(rec)
    run(rec)  # passes: C0 C1 C0 C1 -> window keeps C1 C0 C1 oldest first
    assert rec.dump_dict()["logical_count_per_pass"] == [COUNTS[1], COUNTS[0], COUNTS[1]]


def test_stat_approx_from_physical_ids():
    loc = ExpertLocation.trivial(2, 4, 6, 2)  # experts 0 and 1 have 2 replicas
    rec = make("stat_approx", buffer_size=8, physical_to_logical=loc.physical_to_logical)
    run(rec, loc)
    exact = make("stat", buffer_size=8)
    run(exact)
    assert torch.equal(rec.logical_load(), exact.logical_load())
    d = rec.dump_dict()
    assert len(d["physical_count"][0]) == 6 and sum(d["physical_count"][0]) == 6


def test_stat_approx_needs_placement():
    with pytest.raises(ValueError, match="physical_to_logical"):
        ExpertDistributionRecorder("stat_approx", 2, 4)


def test_per_pass():
    rec = make("per_pass")
    run(rec)
    recs = rec.dump_dict()["records"]
    assert [r["forward_pass_id"] for r in recs] == [0, 1]
    assert [r["logical_count"] for r in recs] == COUNTS


def test_per_token():
    rec = make("per_token")
    run(rec)
    recs = rec.dump_dict()["records"]
    assert len(recs) == 4
    first = recs[0]
    assert first == {"forward_pass_id": 0, "layer": 0, "positions": [0, 1], "topk_ids": [[0, 1], [0, 2]]}
    assert rec.logical_load().tolist() == (torch.tensor(COUNTS[0]) + torch.tensor(COUNTS[1])).tolist()


def test_per_token_positions():
    rec = make("per_token")
    count(rec, 1, torch.tensor([[3, 0]]), positions=torch.tensor([17]))
    rec.end_pass()
    assert rec.dump_dict()["records"][0]["positions"] == [17]


@pytest.mark.parametrize("fmt", ["json", "pt"])
def test_dump_roundtrip(tmp_path, fmt):
    rec = make("stat", buffer_size=4)
    run(rec)
    path = rec.dump(str(tmp_path / f"dump.{fmt}"))
    d = load_dump(path)
    assert d["mode"] == "stat"
    got = d["logical_count"]
    got = got.tolist() if torch.is_tensor(got) else got
    assert got == rec.logical_load().tolist()
    if fmt == "json":
        json.loads(open(path).read())  # plain JSON
    # a dump is a valid --init-expert-location
    loc = ExpertLocation.from_init_arg(path, 2, 4, 6, 2)
    assert loc.logical_count.sum(1).tolist() == [6, 6]


def test_reset_and_delta():
    rec = make("stat")
    run(rec)
    counts, passes = rec.take_load_delta()
    assert passes == 2 and counts.sum() == 12
    counts, passes = rec.take_load_delta()
    assert passes == 0 and counts.sum() == 0
    rec.reset()
    assert rec.num_forward_passes == 0 and rec.logical_load().sum() == 0


def test_bad_args():
    with pytest.raises(ValueError, match="allowed"):
        ExpertDistributionRecorder("sometimes", 2, 4)
    rec = make("per_token")
    with pytest.raises(ValueError, match="layer_idx"):
        rec.record_tokens(5, torch.tensor([[0]]))
    loc = ExpertLocation.trivial(2, 4, 6, 2)
    approx = make("stat_approx", physical_to_logical=loc.physical_to_logical)
    with pytest.raises(ValueError, match="8 slots per layer, the recorder counts 6"):
        approx.set_physical_to_logical(ExpertLocation.trivial(2, 4, 8, 2).physical_to_logical)
    with pytest.raises(ValueError, match="format"):
        rec.dump("/tmp/x.bin", "yaml")


def test_padding_rows_and_passes_while_off_are_not_counted():
    """The counters are device tensors the routing adds to; rows a graph pads with are masked out by
    the routing (seq_lens 0), and a pass run while recording is off is dropped when folded."""
    rec = ExpertDistributionRecorder("stat", 2, 4)
    row = rec.counter(0)
    row += torch.tensor([1, 0, 2, 0], dtype=torch.int32)
    rec.end_pass()  # not recording: dropped
    assert rec.num_forward_passes == 0 and rec.counter(0).sum() == 0
    rec.start()
    assert rec.counter(0).data_ptr() == row.data_ptr()  # the same buffer a graph captured
    row += torch.tensor([1, 0, 2, 0], dtype=torch.int32)
    rec.discard_pass()  # a capture's warm-up: not a pass
    row += torch.tensor([0, 3, 0, 0], dtype=torch.int32)
    rec.end_pass()
    assert rec.num_forward_passes == 1 and rec.logical_load()[0].tolist() == [0, 3, 0, 0]
    assert rec.graph_safe and not make("per_token").graph_safe
