"""Page copies between the device KV pool and the host pool (``--hicache-io-backend``).

* ``direct``: per layer, one indexed copy of K and one of V (2 x layers copies per batch of pages).
* ``kernel``: the pages of every layer are gathered into one contiguous staging tensor on the
  source side and moved in a single copy, then scattered on the destination side (one DMA per
  batch on CUDA instead of 2 x layers; with ``page_first`` the host side needs no scatter).

FP8 pools (``--kv-cache-dtype``) keep FP8 pages in every tier; they are copied as their bytes.

On CUDA both run on the controller's copy stream (see ``controller``), which records an event
per layer so the forward pass waits for each layer's pages only; here they only copy.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

IO_BACKENDS = ("direct", "kernel")


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _idx(pages: list[int], device) -> torch.Tensor:
    return torch.tensor(pages, dtype=torch.int64, device=device)


def raw(t: torch.Tensor) -> torch.Tensor:
    """FP8 pages move as their bytes (torch has no indexed copy for FP8 on every device)."""
    return t.view(torch.uint8) if t.dtype in _FP8 else t


def _raw_layers(pool) -> tuple[list, list]:
    return [raw(k) for k in pool.k_buffers], [raw(v) for v in pool.v_buffers]


def device_to_host(backend: str, device_pool, host_pool, device_pages: list[int], host_pages: list[int]) -> None:
    dev_idx = _idx(device_pages, device_pool.k_buffers[0].device)
    host_idx = _idx(host_pages, "cpu")
    # Device -> host copies block: the host reads the data right after (the copy stream keeps
    # the compute stream running meanwhile).
    dev_k, dev_v = _raw_layers(device_pool)
    host_k, host_v = _raw_layers(host_pool)
    if backend == "direct":
        for layer in range(device_pool.num_layers):
            for src, dst in ((dev_k[layer], host_k[layer]), (dev_v[layer], host_v[layer])):
                dst[host_idx] = src.index_select(0, dev_idx).to("cpu")
        return
    staged = torch.stack([torch.stack([k.index_select(0, dev_idx) for k in dev_k], 1),
                          torch.stack([v.index_select(0, dev_idx) for v in dev_v], 1)], 1)
    on_host = staged.to("cpu")  # [n, 2, layers, ps, heads, dim]
    if host_pool.buffer is not None:
        raw(host_pool.buffer)[host_idx] = on_host
        return
    for layer in range(host_pool.num_layers):
        host_k[layer][host_idx] = on_host[:, 0, layer]
        host_v[layer][host_idx] = on_host[:, 1, layer]


def host_to_device(backend: str, host_pool, device_pool, host_pages: list[int], device_pages: list[int],
                   layer_done: Callable[[int], None] | None = None) -> None:
    """Copy host pages into device pages; ``layer_done(i)`` once layer i's copies are issued."""
    device = device_pool.k_buffers[0].device
    dev_idx = _idx(device_pages, device)
    host_idx = _idx(host_pages, "cpu")
    non_blocking = device.type == "cuda"
    dev_k, dev_v = _raw_layers(device_pool)
    host_k, host_v = _raw_layers(host_pool)
    if backend == "direct":
        for layer in range(device_pool.num_layers):
            for src, dst in ((host_k[layer], dev_k[layer]), (host_v[layer], dev_v[layer])):
                dst.index_copy_(0, dev_idx, src.index_select(0, host_idx).to(device, non_blocking=non_blocking))
            if layer_done is not None:
                layer_done(layer)
        return
    if host_pool.buffer is not None:
        staged = raw(host_pool.buffer).index_select(0, host_idx)
    else:
        staged = torch.stack([torch.stack([k.index_select(0, host_idx) for k in host_k], 1),
                              torch.stack([v.index_select(0, host_idx) for v in host_v], 1)], 1)
    if non_blocking:
        staged = staged.pin_memory()
    on_device = staged.to(device, non_blocking=non_blocking)
    for layer in range(device_pool.num_layers):
        dev_k[layer].index_copy_(0, dev_idx, on_device[:, 0, layer])
        dev_v[layer].index_copy_(0, dev_idx, on_device[:, 1, layer])
        if layer_done is not None:
            layer_done(layer)
