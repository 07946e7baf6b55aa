"""The Triton page-transfer kernel (the ``kernel`` io backend on CUDA) under the Triton
interpreter: byte-exact with its reference (the indexed copies) in both host layouts, both
directions, for 32-, 16- and 8-bit KV."""
from __future__ import annotations

import pytest
import torch
from tandem.engine.kernels.kv_transfer import TritonCopier, kv_transfer_ref
from tandem.hicache.io import PageMove

from tests.unit.engine.test_hicache_io import LAYERS, _pools, _raw, _round_trip


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_kernel_matches_reference(layout, dtype):
    dev_k, host_k = _round_trip(TritonCopier, dtype, layout)
    dev_r, host_r = _round_trip(kv_transfer_ref, dtype, layout)
    assert torch.equal(_raw(host_k.buffer), _raw(host_r.buffer))
    for a, b in zip(dev_k.k_buffers + dev_k.v_buffers, dev_r.k_buffers + dev_r.v_buffers):
        assert torch.equal(_raw(a), _raw(b))


def test_one_layer_launch_touches_that_layer_only():
    dev, host = _pools(torch.bfloat16, "page_first", seed=1)
    before = [_raw(b).clone() for b in dev.k_buffers + dev.v_buffers]
    host.buffer.view(torch.uint8).fill_(7)
    TritonCopier(dev, host, block_words=16).to_device(PageMove([2, 6], [1, 3]), layer=1)  # 24-word chunks: a masked block
    for i, b in enumerate(dev.k_buffers + dev.v_buffers):
        layer = i % LAYERS
        want = before[i].clone()
        if layer == 1:
            want[[2, 6]] = 7
        assert torch.equal(_raw(b), want)
