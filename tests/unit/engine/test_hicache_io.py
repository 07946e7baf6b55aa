"""Host pool layouts and the host <-> device page copies (direct, indexed, and the Triton transfer
kernel under the interpreter) move pages byte-exact for any KV dtype; pool sizing follows the flags."""
from __future__ import annotations

import pytest
import torch
from tandem.engine import KVPool
from tandem.hicache import HiCacheSettings, HostKVPool, host_pool_pages
from tandem.hicache.io import DirectCopier, IndexedCopier, PageMove, page_runs

LAYERS, PAGES, PS, HEADS, DIM = 3, 8, 4, 2, 6


def _pools(dtype, layout, seed=0):
    dev = KVPool(LAYERS, PAGES, PS, HEADS, DIM, dtype, "cpu", num_aux_slots=1)
    g = torch.Generator().manual_seed(seed)
    for buf in dev.k_buffers + dev.v_buffers:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))
    host = HostKVPool(LAYERS, 6, PS, HEADS, DIM, dtype, layout)
    host.buffer.view(torch.uint8).zero_()
    return dev, host


def _raw(t):
    return t.contiguous().view(torch.uint8)


def _round_trip(copier_cls, dtype, layout):
    dev, host = _pools(dtype, layout)
    before = [_raw(b).clone() for b in dev.k_buffers + dev.v_buffers]
    copier = copier_cls(dev, host)
    copier.to_host(PageMove([5, 1, 6, 7], [2, 0, 4, 5]))
    for kv, bufs in ((0, dev.k_buffers), (1, dev.v_buffers)):
        for layer in range(LAYERS):
            for d, h in ((5, 2), (1, 0), (6, 4), (7, 5)):
                assert torch.equal(_raw(host.layer_view(kv, layer)[h]), _raw(bufs[layer][d]))
    move = PageMove([0, 3, 4, 2], [2, 0, 4, 5])
    for layer in range(LAYERS):
        copier.to_device(move, layer)
    for i, bufs in enumerate((dev.k_buffers, dev.v_buffers)):
        for layer in range(LAYERS):
            for src, dst in ((5, 0), (1, 3), (6, 4), (7, 2)):
                assert torch.equal(_raw(bufs[layer][dst]), before[i * LAYERS + layer][src])
    return dev, host


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
@pytest.mark.parametrize("copier", [DirectCopier, IndexedCopier])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_copiers_round_trip_pages(layout, copier, dtype):
    _round_trip(copier, dtype, layout)


def test_runs_of_consecutive_pages():
    move = PageMove([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8])
    assert page_runs(move, host_contiguous=True) == [(4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert page_runs(move, host_contiguous=False) == [(d, h, 1) for d, h in zip(move.device_pages, move.host_pages)]


def test_layouts_address_pages_by_strides():
    for layout in ("layer_first", "page_first"):
        host = HostKVPool(LAYERS, 5, PS, HEADS, DIM, torch.float32, layout)
        host.buffer.copy_(torch.arange(host.buffer.numel(), dtype=torch.float32).view(host.buffer.shape))
        flat = host.buffer.view(-1)
        for page, kv, layer in ((0, 0, 0), (3, 1, 2), (4, 0, 1)):
            at = page * host.page_stride + kv * host.kv_stride + layer * host.layer_stride
            assert torch.equal(host.layer_view(kv, layer)[page].reshape(-1), flat[at:at + host.chunk])
        chunks = host.page_chunks(3)
        assert sum(c.numel() for c in chunks) == host.bytes_per_page
        assert torch.equal(torch.cat(chunks).view(torch.float32), host.page_data(3).reshape(-1))


def test_host_pool_size_from_ratio_or_gb():
    per_page = 2 * 3 * 4 * 2 * 5 * 4
    assert host_pool_pages(HiCacheSettings(ratio=2.5), device_pages=100, bytes_per_page=per_page) == 250
    assert host_pool_pages(HiCacheSettings(ratio=2.0, size_gb=1), 100, per_page) == (1 << 30) // per_page
    host = HostKVPool(3, 4, 4, 2, 5, torch.float32)
    assert host.bytes_per_page == per_page
    assert host.alloc(5) is None and host.alloc(4) == [0, 1, 2, 3] and host.num_free_pages == 0
    with pytest.raises(ValueError, match="hicache_mem_layout"):
        HostKVPool(3, 4, 4, 2, 5, torch.float32, "token_first")
