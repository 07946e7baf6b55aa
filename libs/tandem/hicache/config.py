"""HiCache settings taken from the engine configuration, checked once at start."""
from __future__ import annotations

from dataclasses import dataclass

from .host_pool import LAYOUTS
from .io import IO_BACKENDS

STORAGE_BACKENDS = (None, "file", "nixl")
WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
# A node is backed up to host once hit this many times (SGLang's write_through_threshold);
# write_back backs up only on device eviction.
BACKUP_THRESHOLD = {"write_through": 1, "write_through_selective": 2}
# Storage I/O threads (at most the CPU count): reads of one prefix run in parallel (the GIL is
# released in the system calls and the checksums); writes are not on a request's path.
STORAGE_READ_THREADS = 8
STORAGE_WRITE_THREADS = 2


@dataclass(frozen=True)
class HiCacheSettings:
    ratio: float = 2.0
    size_gb: float = 0.0
    write_policy: str = "write_through"
    mem_layout: str = "layer_first"
    io_backend: str = "direct"
    storage_backend: str | None = None
    storage_dir: str = "/tmp/tandem-hicache"
    prefetch_policy: str = "best_effort"
    prefetch_timeout_s: float = 1.0
    storage_max_bytes: int = 0  # 0: no limit

    @classmethod
    def from_config(cls, cfg) -> HiCacheSettings:
        return cls(ratio=cfg.hicache_ratio, size_gb=cfg.hicache_size, write_policy=cfg.hicache_write_policy,
                   mem_layout=cfg.hicache_mem_layout, io_backend=cfg.hicache_io_backend,
                   storage_backend=cfg.hicache_storage_backend, storage_dir=cfg.hicache_storage_dir,
                   prefetch_policy=cfg.hicache_storage_prefetch_policy,
                   prefetch_timeout_s=cfg.hicache_storage_prefetch_timeout,
                   storage_max_bytes=cfg.hicache_storage_max_bytes)


def validate_settings(s: HiCacheSettings) -> None:
    """Raise ValueError (one line) for a setting that cannot work in this build."""
    if s.write_policy not in WRITE_POLICIES:
        raise ValueError(f"hicache_write_policy={s.write_policy!r}: expected one of {', '.join(WRITE_POLICIES)}")
    if s.mem_layout not in LAYOUTS:
        raise ValueError(f"hicache_mem_layout={s.mem_layout!r}: expected one of {', '.join(LAYOUTS)}")
    if s.io_backend not in IO_BACKENDS:
        raise ValueError(f"hicache_io_backend={s.io_backend!r}: expected one of {', '.join(IO_BACKENDS)}")
    if s.storage_backend not in STORAGE_BACKENDS:
        raise ValueError(f"hicache_storage_backend={s.storage_backend!r}: expected one of file, nixl")


def host_pool_pages(s: HiCacheSettings, device_pages: int, bytes_per_page: int) -> int:
    """Host pool pages: --hicache-size GB when given, else --hicache-ratio x the device pool."""
    if s.size_gb:
        return max(1, int(s.size_gb * (1 << 30)) // bytes_per_page)
    return max(1, int(device_pages * s.ratio))
