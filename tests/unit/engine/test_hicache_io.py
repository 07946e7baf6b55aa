"""Host pool layouts and copy backends move pages byte-exact; pool sizing follows the flags."""
from __future__ import annotations

import pytest
import torch
from tandem.engine import KVPool
from tandem.hicache import HiCacheSettings, HostKVPool, host_pool_pages
from tandem.hicache.io import device_to_host, host_to_device


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
@pytest.mark.parametrize("backend", ["direct", "kernel"])
def test_pages_round_trip(layout, backend):
    dev = KVPool(num_layers=3, num_pages=8, page_size=4, num_kv_heads=2, head_dim=5, dtype=torch.float32,
                 device="cpu", num_aux_slots=1)
    for buf in dev.k_buffers + dev.v_buffers:
        buf.copy_(torch.randn_like(buf))
    before = [b.clone() for b in dev.k_buffers + dev.v_buffers]
    host = HostKVPool(3, 6, 4, 2, 5, torch.float32, layout)
    device_to_host(backend, dev, host, [5, 1, 6], [2, 0, 4])
    assert torch.equal(host.k_buffers[1][0], dev.k_buffers[1][1])
    assert torch.equal(host.page_data(4)[1, 2], dev.v_buffers[2][6])  # [K/V, layer, ...]
    host_to_device(backend, host, dev, [2, 0, 4], [0, 3, 7])
    for layer in range(3):
        for src, dst, buf in ((5, 0, dev.k_buffers), (1, 3, dev.k_buffers), (6, 7, dev.v_buffers)):
            ref = before[layer] if buf is dev.k_buffers else before[3 + layer]
            assert torch.equal(buf[layer][dst], ref[src])
    data = host.page_data(2).clone()
    host.set_page_data(5, data)
    assert torch.equal(host.page_data(5), data)


def test_host_pool_size_from_ratio_or_gb():
    per_page = 2 * 3 * 4 * 2 * 5 * 4
    assert host_pool_pages(HiCacheSettings(ratio=2.5), device_pages=100, bytes_per_page=per_page) == 250
    assert host_pool_pages(HiCacheSettings(ratio=2.0, size_gb=1), 100, per_page) == (1 << 30) // per_page
    host = HostKVPool(3, 4, 4, 2, 5, torch.float32)
    assert host.bytes_per_page == per_page
    assert host.alloc(5) is None and host.alloc(4) == [0, 1, 2, 3] and host.num_free_pages == 0
    with pytest.raises(ValueError, match="hicache_mem_layout"):
        HostKVPool(3, 4, 4, 2, 5, torch.float32, "token_first")
