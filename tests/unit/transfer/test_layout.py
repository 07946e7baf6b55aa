"""Layout, page validation, run merging and aux row format."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tandem.transfer import (
    AuxRow,
    KvBuffers,
    LayoutMismatchError,
    SampleToken,
    aux_max_samples,
    aux_max_top,
    build_layout,
    check_compatible,
    merge_page_runs,
    pack_aux_row,
    pages_needed,
    unpack_aux_row,
    validate_pages,
)
from tandem.transfer.aux import AUX_HEADER
from tandem.transfer.layout import check_addresses, check_allocation, run_descriptors
from transfer_helpers import make_buffers


def test_build_layout_fields():
    b = make_buffers(num_layers=3, num_pages=40, page_size=16, dtype=torch.bfloat16)
    lay = build_layout(b, "demo@abc")
    assert (lay.num_layers, lay.page_size, lay.num_kv_heads, lay.head_dim) == (3, 16, 2, 8)
    assert lay.dtype == "bfloat16"
    assert lay.bytes_per_page == 16 * 2 * 8 * 2
    assert lay.num_pages == 40
    assert list(lay.k_base_addrs) == [t.data_ptr() for t in b.k]
    assert list(lay.v_base_addrs) == [t.data_ptr() for t in b.v]
    assert lay.aux_base_addr == b.aux.data_ptr()
    assert (lay.aux_slot_bytes, lay.num_aux_slots) == (64, 8)
    assert (lay.mem_type, lay.device_id, lay.model_fingerprint) == ("DRAM", 0, "demo@abc")
    assert (lay.aux_mem_type, lay.aux_device_id) == ("DRAM", 0)
    check_addresses(lay)


def test_regions_coalesce_one_allocation():
    # All layers in one tensor (as an engine may allocate) -> K block and V block merge.
    big = torch.zeros(2, 4, 10, 2, 2, 4)  # [k/v, layers, pages, page, heads, dim]
    aux = torch.zeros(4, 64, dtype=torch.uint8)
    b = KvBuffers([big[0, i] for i in range(4)], [big[1, i] for i in range(4)], aux)
    regions = b.regions()
    assert (big.data_ptr(), big.numel() * 4, 0) in regions
    assert len(regions) == 2
    assert sum(r[1] for r in regions) == big.numel() * 4 + aux.numel()


@pytest.mark.parametrize(
    "k, v, aux, match",
    [
        ([torch.zeros(4, 2, 1, 4)], [], torch.zeros(2, 64, dtype=torch.uint8), "one K and one V"),
        ([torch.zeros(4, 2, 4)], [torch.zeros(4, 2, 4)], torch.zeros(2, 64, dtype=torch.uint8),
         r"\[num_pages, page_size"),
        ([torch.zeros(4, 2, 1, 4)], [torch.zeros(5, 2, 1, 4)],
         torch.zeros(2, 64, dtype=torch.uint8), r"v\[0\]"),
        ([torch.zeros(4, 2, 1, 4)], [torch.zeros(4, 2, 1, 4)],
         torch.zeros(2, 32, dtype=torch.uint8), "aux_slot_bytes is 32, must be >= 64"),
        ([torch.zeros(4, 2, 1, 4)], [torch.zeros(4, 2, 1, 4)], torch.zeros(2, 64), "uint8"),
        ([torch.zeros(4, 2, 1, 8)[..., ::2]], [torch.zeros(4, 2, 1, 4)],
         torch.zeros(2, 64, dtype=torch.uint8), "contiguous"),
    ],
)
def test_kv_buffers_rejects_bad_pools(k, v, aux, match):
    with pytest.raises(ValueError, match=match):
        KvBuffers(k, v, aux)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_layers=4), "num_layers"),
        (dict(page_size=8), "page_size"),
        (dict(kv_heads=4), "num_kv_heads"),
        (dict(head_dim=16), "head_dim"),
        (dict(dtype=torch.bfloat16), "dtype"),
    ],
)
def test_check_compatible_names_field(kwargs, field):
    local = build_layout(make_buffers(), "m")
    remote = build_layout(make_buffers(**kwargs), "m")
    with pytest.raises(LayoutMismatchError, match=field) as e:
        check_compatible(local, remote)
    assert e.value.field == field


def test_fp8_kv_layout_carries_dtype_and_scales_and_mismatches_are_refused():
    """--kv-cache-dtype: prefill and decode must hold the same FP8 format and the same scales;
    the refusal names both sides' values and the flag to fix."""
    fp8 = build_layout(make_buffers(dtype=torch.float8_e4m3fn), "m")
    assert fp8.dtype == "float8_e4m3fn" and fp8.bytes_per_page == 16 * 2 * 8
    assert fp8.k_scales == (0.25, 0.5, 0.75) and fp8.v_scales == (0.75, 0.5, 0.25)
    for other, what in ((make_buffers(dtype=torch.bfloat16), "local='float8_e4m3fn' remote='bfloat16'"),
                        (make_buffers(dtype=torch.float8_e5m2), "local='float8_e4m3fn' remote='float8_e5m2'")):
        with pytest.raises(LayoutMismatchError, match="--kv-cache-dtype") as e:
            check_compatible(fp8, build_layout(other, "m"))
        assert e.value.field == "dtype" and what in str(e.value)
    b = make_buffers(dtype=torch.float8_e4m3fn)
    rescaled = KvBuffers(b.k, b.v, b.aux, [0.25, 0.5, 0.7], b.v_scales)
    with pytest.raises(LayoutMismatchError, match=r"k_scales: layer 2: local=0.75 remote=0.7 .*calibrate"):
        check_compatible(fp8, build_layout(rescaled, "m"))
    check_compatible(fp8, build_layout(make_buffers(dtype=torch.float8_e4m3fn, num_pages=7), "m"))


def test_fp8_kv_buffers_need_their_scales():
    b = make_buffers(dtype=torch.float8_e5m2, num_layers=2)
    with pytest.raises(ValueError, match="one K and one V scale per layer: got 0 and 0 for 2 layers"):
        KvBuffers(b.k, b.v, b.aux)
    f = make_buffers(num_layers=2)
    with pytest.raises(ValueError, match="KV scales are for FP8 K/V, not torch.float32"):
        KvBuffers(f.k, f.v, f.aux, [1.0, 1.0], [1.0, 1.0])


def test_check_compatible_fingerprint_and_ok_cases():
    local = build_layout(make_buffers(), "model-a")
    with pytest.raises(LayoutMismatchError, match="model_fingerprint.*model-a.*model-b"):
        check_compatible(local, build_layout(make_buffers(), "model-b"))
    # Different pool sizes and aux slots are fine.
    check_compatible(local, build_layout(make_buffers(num_pages=7, aux_slots=3), "model-a"))


def test_check_addresses():
    lay = dataclasses.replace(build_layout(make_buffers(num_layers=2)), v_base_addrs=())
    with pytest.raises(ValueError, match="0 V base addresses for 2 layers"):
        check_addresses(lay)


def test_check_allocation_is_the_one_page_check():
    remote = build_layout(make_buffers(num_pages=10, aux_slots=4))
    check_allocation(remote, [0, 9, 3], 3, num_pages=3)
    for pages, aux, n, match in (([0, 10, 3], 0, 3, "decode page index 10 out of range"),
                                 ([0, 1], 0, 3, "allocation has 2 pages, the prompt needs 3"),
                                 ([2, 2, 3], 0, 3, "repeats a page index"),
                                 ([0, 1, 2], 4, 3, "aux slot 4 out of range for 4 aux slots")):
        with pytest.raises(ValueError, match=match):
            check_allocation(remote, pages, aux, num_pages=n)


def test_validate_pages():
    assert validate_pages([0, 9, 3], 10).tolist() == [0, 9, 3]
    assert validate_pages([], 10).size == 0
    with pytest.raises(ValueError, match="page index 10 out of range for a pool of 10 pages"):
        validate_pages([1, 10, 11], 10)
    with pytest.raises(ValueError, match="decode page index -1 out of range"):
        validate_pages([-1], 10, "decode page")


def test_merge_page_runs_examples():
    assert merge_page_runs([], []).shape == (0, 3)
    runs = merge_page_runs([0, 1, 2, 7, 8, 3], [5, 6, 7, 0, 1, 2])
    assert runs.tolist() == [[0, 5, 3], [7, 0, 2], [3, 2, 1]]
    # Contiguous on one side only: must split.
    assert merge_page_runs([0, 1, 2], [4, 6, 7]).tolist() == [[0, 4, 1], [1, 6, 2]]
    with pytest.raises(ValueError, match="3 source pages but 2 destination pages"):
        merge_page_runs([0, 1, 2], [0, 1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=40))
def test_merge_page_runs_expands_back_and_is_minimal(pairs):
    src = [p[0] for p in pairs]
    dst = [p[1] for p in pairs]
    runs = merge_page_runs(src, dst)
    exp_src = [s + i for s, _, n in runs for i in range(n)]
    exp_dst = [d + i for _, d, n in runs for i in range(n)]
    assert exp_src == src and exp_dst == dst
    # Minimal: consecutive runs could not have been joined.
    for (s0, d0, n0), (s1, d1, _) in zip(runs[:-1], runs[1:], strict=True):
        assert not (s0 + n0 == s1 and d0 + n0 == d1)


def test_run_descriptors_addresses():
    a, b = make_buffers(num_layers=2), make_buffers(num_layers=2, num_pages=50)
    la, lb = build_layout(a), build_layout(b)
    runs = merge_page_runs([3, 4, 9], [10, 11, 0])
    src, dst = run_descriptors(la, lb, runs)
    bpp = la.bytes_per_page
    assert src.shape == dst.shape == (2 * 2 * 2, 3)  # 2 layers x K,V x 2 runs
    # Row order: K of layer 0 (runs), K of layer 1, V of layer 0, V of layer 1.
    assert src[0].tolist() == [a.k[0].data_ptr() + 3 * bpp, 2 * bpp, 0]
    assert dst[0].tolist() == [b.k[0].data_ptr() + 10 * bpp, 2 * bpp, 0]
    assert src[3].tolist() == [a.k[1].data_ptr() + 9 * bpp, bpp, 0]
    assert dst[5].tolist() == [b.v[0].data_ptr() + 0, bpp, 0]


def test_aux_row_roundtrip_and_truncation():
    row = AuxRow.one(2**62 + 5, 31999, -0.125, 48, [(i, -float(i)) for i in range(10)])
    data = pack_aux_row(row, 64)
    assert len(data) == 64
    assert aux_max_top(64) == (64 - AUX_HEADER.size - 8) // 8 == 5
    back = unpack_aux_row(data)
    assert (back.room, back.first_token_id, back.samples[0].logprob, back.cached_tokens) == (
        row.room, 31999, -0.125, 48)
    assert back.samples[0].top_logprobs == row.samples[0].top_logprobs[:5]
    big = unpack_aux_row(pack_aux_row(row, 256))
    assert big.samples[0].top_logprobs == row.samples[0].top_logprobs
    # Little-endian fixed offsets, as documented: room, cached, num_samples, num_top, entries.
    assert int.from_bytes(data[0:8], "little") == 2**62 + 5
    assert int.from_bytes(data[8:12], "little") == 48
    assert (int.from_bytes(data[12:14], "little"), int.from_bytes(data[14:16], "little")) == (1, 5)
    assert int.from_bytes(data[16:20], "little") == 31999
    assert unpack_aux_row(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == back


def test_aux_row_carries_the_first_token_of_each_sample():
    # n parallel samples: each sample's first token (and its logprobs) in one row.
    assert aux_max_samples(64) == 6 and aux_max_top(64, 3) == 1
    row = AuxRow(9, [SampleToken(10 + i, -0.5 * i, [(i, -1.0), (i + 1, -2.0)]) for i in range(3)], 7)
    back = unpack_aux_row(pack_aux_row(row, 64))
    assert [s.token_id for s in back.samples] == [10, 11, 12]
    assert [s.logprob for s in back.samples] == [0.0, -0.5, -1.0]
    assert [s.top_logprobs for s in back.samples] == [[(i, -1.0)] for i in range(3)]  # one top fits
    full = unpack_aux_row(pack_aux_row(row, 256))
    assert full == row
    six = AuxRow(1, [SampleToken(i) for i in range(6)])
    assert [s.token_id for s in unpack_aux_row(pack_aux_row(six, 64)).samples] == list(range(6))
    with pytest.raises(ValueError, match="1 to 6 samples in a 64-byte slot, got 7"):
        pack_aux_row(AuxRow(1, [SampleToken(i) for i in range(7)]), 64)


def test_aux_row_nan_logprob_and_bad_input():
    r = unpack_aux_row(pack_aux_row(AuxRow.one(1, 2), 64))
    assert math.isnan(r.samples[0].logprob) and r.samples[0].top_logprobs == []
    with pytest.raises(ValueError, match="1 to 0 samples"):
        pack_aux_row(AuxRow.one(1, 2), 16)
    with pytest.raises(ValueError, match="different numbers of top logprobs"):
        pack_aux_row(AuxRow(1, [SampleToken(1, 0.0, [(1, 0.0)]), SampleToken(2)]), 64)
    bad = bytearray(pack_aux_row(AuxRow.one(1, 2), 64))
    bad[14:16] = (99).to_bytes(2, "little")
    with pytest.raises(ValueError, match="claims 1 samples with 99 top logprobs"):
        unpack_aux_row(bytes(bad))
    cleared = unpack_aux_row(bytes(64))  # a zeroed slot: no row for any room
    assert (cleared.room, cleared.samples) == (0, [])


def test_pages_needed():
    assert [pages_needed(n, 16) for n in (1, 16, 17, 0)] == [1, 1, 2, 0]
    assert pages_needed(5, 1) == 5
    assert np.int64(pages_needed(33, 16)) == 3
