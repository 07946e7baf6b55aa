"""Builds the engine's prefix cache: the plain radix cache, or the tier-aware one with a
HiCache controller when --enable-hierarchical-cache is on (flags checked here, at start)."""
from __future__ import annotations

import hashlib
import os

import torch
from tandem.config.schemas import EngineConfig
from tandem.hicache import HiCacheController, HiCacheSettings, host_pool_pages, validate_settings
from tandem.hicache.io import CopierFactory, default_copier

from .hiradix_cache import HiRadixCache
from .kv_pool import KVPool
from .radix_cache import RadixCache


def build_prefix_cache(cfg: EngineConfig, pool: KVPool) -> tuple[RadixCache, HiCacheController | None]:
    if not cfg.enable_hierarchical_cache:
        if cfg.hicache_storage_backend:
            raise ValueError("hicache_storage_backend needs --enable-hierarchical-cache (storage sits under the host tier)")
        return RadixCache(pool.page_size, pool.free, disabled=cfg.disable_radix_cache), None
    if cfg.disable_radix_cache:
        raise ValueError("enable_hierarchical_cache needs the radix cache: drop --disable-radix-cache")
    if cfg.world_size > 1:
        raise ValueError(f"enable_hierarchical_cache with --tp-size {cfg.tp_size} / --ep-size {cfg.ep_size} is not "
                         "supported: pages loaded back on the leader would be missing from the followers' KV pools")
    settings = HiCacheSettings.from_config(cfg)
    validate_settings(settings)
    bytes_per_page = 2 * pool.num_layers * pool.page_size * pool.num_kv_heads * pool.head_dim * pool.dtype.itemsize
    host_pages = host_pool_pages(settings, pool.num_pages, bytes_per_page)
    ctl = HiCacheController(settings, pool, host_pages, storage_namespace(cfg.model_path, pool),
                            copier=page_copier(settings.io_backend, pool.k_buffers[0].device))
    return HiRadixCache(pool.page_size, pool, ctl), ctl


def page_copier(io_backend: str, device) -> CopierFactory:
    """How host <-> device page copies run: on CUDA ``kernel`` is the Triton transfer kernel
    (imported only there: the CPU engine needs no triton); otherwise the copies of tandem.hicache.io."""
    if io_backend == "kernel" and torch.device(device).type == "cuda":
        from .kernels.kv_transfer import TritonCopier

        return TritonCopier
    return lambda device_pool, host_pool: default_copier(io_backend, device_pool, host_pool)


def storage_namespace(model_path: str, pool: KVPool) -> str:
    """Storage subfolder: pages of one checkpoint (its config.json and weight file sizes), KV
    dtype (and, for FP8 pages, the K/V scales they were quantized with) and page size only ever
    meet each other."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if name == "config.json":
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(path)}".encode())
    if pool.is_fp8:
        h.update(pool.kv_scales.cpu().numpy().tobytes())
    dtype = str(pool.dtype).removeprefix("torch.")
    return f"{os.path.basename(os.path.normpath(model_path))}-{h.hexdigest()}-{dtype}-ps{pool.page_size}"
