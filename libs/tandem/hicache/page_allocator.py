"""The free list of a paged KV pool: page indices handed out lowest first, all or nothing.

Both tiers use it: the device pool (``tandem.engine.kv_pool.KVPool``) and the host pool
(``HostKVPool``). It lives here, below the engine in the layering, so that both can.
"""
from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop from the end: low indices first

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:][::-1]
        del self._free[-n:]
        return out

    def free(self, pages) -> None:
        self._free.extend(pages)
