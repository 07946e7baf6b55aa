"""HiCache: the host-memory and storage tiers below the engine's device KV pool.

This package knows nothing of the engine's radix tree or scheduler: it holds host pages
(``host_pool``; its free list, ``page_allocator``, serves the device pool too), moves pages
between a device pool and the host (``io``; the engine brings a Triton kernel for CUDA), keeps
pages in a storage tier (``file_storage``, bounded by ``storage_index``; read by ``prefetch``,
written by ``storage_writer``) and ties them together (``controller``: copy streams, events,
polling). The engine's
tier-aware radix cache (``tandem.engine.hiradix_cache``) decides what moves when.
"""
from .config import HiCacheSettings, host_pool_pages, validate_settings
from .controller import BACKUP, LOAD, STORE, HiCacheController, HiCacheCounters, StoreRequest
from .file_storage import FileStorage
from .host_pool import HostKVPool

__all__ = ["BACKUP", "LOAD", "STORE", "HiCacheController", "HiCacheCounters", "HiCacheSettings", "HostKVPool",
           "FileStorage", "StoreRequest", "host_pool_pages", "validate_settings"]
