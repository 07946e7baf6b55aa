"""Tier-aware radix cache (HiCache): a node's KV lives on the device, on the host, or both, and
its page may also be in storage under the node's block hash.

Invariants: a node on the device has its parent on the device (device pages form the top of
the tree); a node off the device has a host copy; nodes with ``io_busy`` are never dropped.
Eviction goes device -> host -> storage -> gone:

* device eviction takes unlocked nodes with no child on the device, least recently used
  first; a node with a host copy just loses its device page (a ``BlockRemoved`` event: the
  router follows device blocks); one without is backed up first when the write policy wants
  it (write_back always; write_through / selective once hit often enough), else dropped.
* host eviction takes childless nodes off the device: their host page is freed and they leave
  the tree (their page stays in storage, where it was written at backup time).

Write policies (SGLang's): ``write_through`` backs a node up when it is created,
``write_through_selective`` once it has been hit twice, ``write_back`` on device eviction.
Admission calls ``match_and_load``: the device prefix, then nodes found on the host, then
pages found in storage (following the hash chain) are loaded into device pages before the
request's prefill, which computes only the rest.
"""
from __future__ import annotations

import heapq

from tandem.hicache import HiCacheController
from tandem.hicache.config import BACKUP_THRESHOLD

from .radix_cache import DEVICE, HOST, AllBlocksCleared, BlockRemoved, BlockStored, Node, RadixCache, _tick, block_hash


class HiRadixCache(RadixCache):
    def __init__(self, page_size: int, pool, controller: HiCacheController):
        super().__init__(page_size, pool.free)
        self.pool, self.ctl = pool, controller
        self.threshold = BACKUP_THRESHOLD.get(controller.settings.write_policy)  # None: write_back
        self.num_host_nodes = 0  # nodes holding a host page

    # ---- backup ------------------------------------------------------------------------------
    def _wants_backup(self, node: Node) -> bool:
        return node.host_page < 0 and (self.threshold is None or node.hit_count >= self.threshold)

    def _backup(self, nodes: list) -> None:
        """Copy these device nodes to host pages (as many as the host can take) and to storage."""
        nodes = [n for n in nodes if n.host_page < 0 and n.page >= 0]
        if not nodes:
            return
        for n in nodes:
            n.io_busy += 1
        short = len(nodes) - self.ctl.host.num_free_pages
        if short > 0:
            self._evict_host(short)
        nodes = nodes[: self.ctl.host.num_free_pages]
        host_pages = self.ctl.backup([n.page for n in nodes]) if nodes else []
        for n, hp in zip(nodes, host_pages):
            n.host_page = hp
            self.num_host_nodes += 1
            self.ctl.store(n.hash, n.tokens, hp)
            self._emit_stored([n], HOST)
        for n in nodes:
            n.io_busy -= 1

    def _on_device_nodes(self, nodes: list) -> None:
        for n in nodes:
            n.hit_count += 1
        if self.threshold is not None:
            self._backup([n for n in nodes if self._wants_backup(n)])

    def _revive(self, node: Node, page: int) -> None:
        node.page = page
        self.num_pages += 1
        if node.lock_ref == 0:
            self.evictable_pages += 1

    # ---- admission: match and load back ------------------------------------------------------
    def match_and_load(self, token_ids) -> tuple[list[int], Node, bool]:
        pages, node = self.match_prefix(token_ids)
        ps = self.page_size
        i = len(pages)
        host_nodes, walk = [], node
        while (i + 1) * ps <= len(token_ids):
            child = walk.children.get(tuple(token_ids[i * ps:(i + 1) * ps]))
            if child is None:
                break
            host_nodes.append(child)
            walk, i = child, i + 1
        chain, key = [], walk.hash  # (key, tokens) of the blocks past the tree, for storage
        while self.ctl.storage is not None and (i + 1) * ps <= len(token_ids):
            toks = tuple(token_ids[i * ps:(i + 1) * ps])
            key = block_hash(key, toks)
            chain.append((key, toks))
            i += 1
        data = self.ctl.prefetched(chain)
        if data is None:
            return pages, node, False
        stored = [(k, t, d) for (k, t), d in zip(chain, data)]
        if not host_nodes and not stored:
            self._count_hits(node)
            return pages, node, True
        # Protect the device prefix and the host nodes while pages are found for the load.
        self.lock(node)
        for n in host_nodes:
            n.io_busy += 1
        want = len(host_nodes) + len(stored)
        short = want - self.pool.num_free_pages
        if short > 0:
            self.evict(short)
        got = self.pool.alloc(min(want, self.pool.num_free_pages)) or []
        for n in host_nodes:
            n.io_busy -= 1
        self.unlock(node)
        n_host = min(len(got), len(host_nodes))
        if n_host:
            loaded = host_nodes[:n_host]
            self.ctl.load_back([n.host_page for n in loaded], got[:n_host])
            for n, p in zip(loaded, got[:n_host]):
                self._revive(n, p)
                n.last_access = next(_tick)
            self._emit_stored(loaded)
            self.ctl.counters.host_hit_tokens += n_host * ps
            pages += got[:n_host]
            node = loaded[-1]
        self._count_hits(node)
        n_stored = len(got) - n_host if n_host == len(host_nodes) else 0
        if len(got) > n_host + n_stored:
            self.pool.free(got[n_host + n_stored:])
        if n_stored:
            self.ctl.load_from_storage([d for _, _, d in stored[:n_stored]], got[n_host:])
            chain = []
            for (key, toks, _), p in zip(stored, got[n_host:]):
                child = Node(tokens=toks, page=p, parent=node, hash=key, last_access=next(_tick))
                node.children[toks] = child
                self.num_pages += 1
                self.evictable_pages += 1
                chain.append(child)
                node = child
            self._emit_stored(chain)
            self.ctl.counters.storage_hit_tokens += n_stored * ps
            pages += got[n_host:]
            self._on_device_nodes(chain)
        return pages, node, True

    def _count_hits(self, node: Node) -> None:
        """A request matched the path to node: hot nodes get backed up (write_through_selective)."""
        path = []
        while node is not self.root:
            node.hit_count += 1
            path.append(node)
            node = node.parent
        if self.threshold is not None:
            self._backup([n for n in reversed(path) if self._wants_backup(n)])

    # ---- eviction ----------------------------------------------------------------------------
    def _device_leaf(self, n: Node) -> bool:
        return (n is not self.root and n.page >= 0 and n.lock_ref == 0 and n.io_busy == 0
                and not any(c.page >= 0 for c in n.children.values()))

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages device pages, least recently used first (device -> host)."""
        if num_pages <= 0 or self.evictable_pages == 0:
            return 0
        heap = [(n.last_access, id(n), n) for n in self._all_nodes() if self._device_leaf(n)]
        heapq.heapify(heap)
        freed, removed = [], []
        while heap and len(freed) < num_pages:
            _, _, n = heapq.heappop(heap)
            if not self._device_leaf(n):
                continue
            if n.host_page < 0 and (self.threshold is None or n.hit_count >= self.threshold):
                self._backup([n])
            freed.append(n.page)
            removed.append(n.hash)
            n.page = -1
            self.num_pages -= 1
            self.evictable_pages -= 1
            parent = n.parent
            if n.host_page < 0:
                self._drop(n)
            if self._device_leaf(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.ctl.counters.evicted_tokens += len(freed) * self.page_size
        self._free_pages(freed)
        self._emit([BlockRemoved(block_hashes=removed)])
        return len(freed)

    def _evict_host(self, num_pages: int) -> int:
        """Free up to num_pages host pages: childless nodes off the device leave the tree."""
        heap = [(n.last_access, id(n), n) for n in self._all_nodes() if self._host_leaf(n)]
        heapq.heapify(heap)
        done = 0
        while heap and done < num_pages:
            _, _, n = heapq.heappop(heap)
            parent = n.parent
            self._drop(n)
            done += 1
            if self._host_leaf(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return done

    def _host_leaf(self, n: Node) -> bool:
        return n is not self.root and n.page < 0 and n.host_page >= 0 and not n.children and n.io_busy == 0

    def _drop(self, n: Node) -> None:
        """Remove a node off the device, and its subtree (all off the device), from the tree."""
        stack, removed = [n], []
        while stack:
            m = stack.pop()
            stack.extend(m.children.values())
            if m.host_page >= 0:
                self.ctl.host.free([m.host_page])
                m.host_page = -1
                self.num_host_nodes -= 1
                removed.append(m.hash)
        del n.parent.children[n.tokens]
        if removed:
            self._emit([BlockRemoved(block_hashes=removed, tier=HOST)])

    def _all_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def reset(self) -> bool:
        """Drop every unlocked page on the device and the host (storage keeps its pages)."""
        self.evict(self.evictable_pages)
        for n in [c for c in self.root.children.values() if c.page < 0 and c.io_busy == 0]:
            self._drop(n)
        empty = not self.root.children
        if empty:
            self._emit([AllBlocksCleared()])
        return empty

    def snapshot(self) -> list:
        """The blocks on the device and on the host, as BlockStored events, parents first."""
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            for tier, held in ((DEVICE, n.page >= 0), (HOST, n.host_page >= 0)):
                if held:
                    out.append(BlockStored([n.hash], n.parent.hash if n.parent is not self.root else None,
                                           list(n.tokens), self.page_size, tier))
            stack.extend(n.children.values())
        return out
