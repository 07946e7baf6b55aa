"""What the storage folder holds, for ``--hicache-storage-max-bytes``: each page's size, its
parent page (the previous block of its hash chain) and when it was last written or read.

Eviction takes the least recently used *leaf* (a page no stored page continues), again and
again until the folder fits: a chain is read and written parent first, so its pages age
together and the oldest chain goes from its tail to its root before a newer chain loses a
page, and no page is removed while a stored page still continues it (its chain would be
unreachable: lookups follow the chain from the root). A prefix shared by a newer chain stays
as long as that chain does.

Not thread-safe: the storage backend calls it under its lock.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass


@dataclass
class _Entry:
    size: int
    parent: int  # 0: the first block of a chain
    age: int
    children: int = 0


class StorageIndex:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._entries: dict[int, _Entry] = {}
        self._waiting_parent: dict[int, int] = {}  # key -> pages stored whose parent (key) is not (yet)
        self._leaves: list[tuple[int, int]] = []  # (age, key), stale entries skipped on pop
        self._clock = itertools.count()

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: int, parent: int, size: int) -> None:
        """A page now in the folder (or written again: it counts as used now)."""
        if key in self._entries:
            self.touch(key)
            return
        e = self._entries[key] = _Entry(size, parent, next(self._clock), self._waiting_parent.pop(key, 0))
        self.total_bytes += size
        if parent in self._entries:
            self._entries[parent].children += 1
        elif parent:
            self._waiting_parent[parent] = self._waiting_parent.get(parent, 0) + 1  # written in parallel
        if e.children == 0:
            heapq.heappush(self._leaves, (e.age, key))

    def load(self, pages: list[tuple[int, int, int, float]]) -> None:
        """Fill an empty index from the folder's pages ``(key, parent, size, mtime)``, oldest first
        by modification time (parents may come after their children here)."""
        for key, parent, size, _ in sorted(pages, key=lambda p: p[3]):
            if key not in self._entries:
                self._entries[key] = _Entry(size, parent, next(self._clock))
                self.total_bytes += size
        for e in self._entries.values():
            if e.parent in self._entries:
                self._entries[e.parent].children += 1
            elif e.parent:
                self._waiting_parent[e.parent] = self._waiting_parent.get(e.parent, 0) + 1
        self._leaves = [(e.age, k) for k, e in self._entries.items() if e.children == 0]
        heapq.heapify(self._leaves)

    def touch(self, key: int) -> None:
        e = self._entries.get(key)
        if e is not None:
            e.age = next(self._clock)
            if e.children == 0:
                heapq.heappush(self._leaves, (e.age, key))

    def remove(self, key: int) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        self.total_bytes -= e.size
        p = self._entries.get(e.parent)
        if p is not None:
            p.children -= 1
            if p.children == 0:
                heapq.heappush(self._leaves, (p.age, e.parent))
        elif e.parent in self._waiting_parent:
            self._waiting_parent[e.parent] -= 1
            if not self._waiting_parent[e.parent]:
                del self._waiting_parent[e.parent]

    def victims(self) -> list[int]:
        """Keys to remove (removed from the index already) so that the folder fits max_bytes
        (0: no limit)."""
        out = []
        while self.max_bytes and self.total_bytes > self.max_bytes and self._leaves:
            age, key = heapq.heappop(self._leaves)
            e = self._entries.get(key)
            if e is None or e.age != age or e.children:
                continue  # stale: touched since, continued since, or gone
            self.remove(key)
            out.append(key)
        return out
