"""Tier-aware radix cache (HiCache): a node's KV lives on the device, on the host, or both, and
its page may also be in storage under the node's block hash.

Invariants: a node on the device has its parent on the device (device pages form the top of
the tree); a node off the device has a host copy. Copies are asynchronous (``HiCacheController``
issues them on copy streams and reports them done when polled, once per scheduling step):

* ``io_busy > 0`` while a backup reads a node's device page into its host page or a load-back
  fills its device page from its host page: the node is neither evicted from the device nor
  dropped from the host (a page in flight is never freed, reused or overwritten), and its
  device page does not count as evictable;
* ``storage_busy > 0`` while its host page is being written to storage: the host page is not
  freed (a node dropped meanwhile gives its host page back when the write is done).

Eviction goes device -> host -> storage -> gone:

* device eviction takes unlocked, idle nodes with no child on the device, least recently used
  first; a node with a host copy just loses its device page (a ``BlockRemoved`` event: the
  router follows device blocks); one without is backed up first when the write policy wants
  it (write_back always; write_through / selective once hit often enough; eviction waits for
  that copy), else dropped.
* host eviction takes idle childless nodes off the device: their host page is freed and they
  leave the tree (their page stays in storage, where it was written after the backup).

Write policies (SGLang's): ``write_through`` backs a node up as soon as its KV is computed
(per prefill chunk), ``write_through_selective`` once it has been hit twice, ``write_back`` on
device eviction. A backup that finds no free host page is skipped and counted
(``backup_skipped_pages``). Admission calls ``match_and_load``: the device prefix, then nodes
found on the host, then pages read from storage (following the hash chain, straight into host
pages, where they become host nodes) are loaded back into device pages, layer by layer,
before the request's prefill, which computes only the rest.
"""
from __future__ import annotations

import heapq

from tandem.hicache import BACKUP, LOAD, STORE, HiCacheController, StoreRequest
from tandem.hicache.config import BACKUP_THRESHOLD

from .radix_cache import DEVICE, HOST, AllBlocksCleared, BlockRemoved, BlockStored, Node, RadixCache, _tick, block_hash


class HiRadixCache(RadixCache):
    def __init__(self, page_size: int, pool, controller: HiCacheController):
        super().__init__(page_size, pool.free)
        self.pool, self.ctl = pool, controller
        self.threshold = BACKUP_THRESHOLD.get(controller.settings.write_policy)  # None: write_back
        self.num_host_nodes = 0  # nodes in the tree holding a host page
        self._dropped_storing: set[Node] = set()  # left the tree while their host page is written to storage

    # ---- moves in flight -----------------------------------------------------------------------
    def _hold(self, n: Node) -> None:
        if n.io_busy == 0 and n.lock_ref == 0 and n.page >= 0:
            self.evictable_pages -= 1
        n.io_busy += 1

    def _release(self, n: Node) -> None:
        n.io_busy -= 1
        if n.io_busy == 0 and n.lock_ref == 0 and n.page >= 0:
            self.evictable_pages += 1

    def poll(self) -> None:
        """Once per scheduling step: apply the moves that finished, take back the host pages of
        storage reads nobody waits for any more."""
        reclaimed = self.ctl.prefetch_step()
        if reclaimed:
            self.ctl.host.free(reclaimed)
        self._apply_finished()

    def _apply_finished(self) -> None:
        freed = []
        for kind, tag in self.ctl.poll():
            if kind in (BACKUP, LOAD):
                for n in tag:
                    self._release(n)
            elif kind == STORE:
                tag.storage_busy -= 1
                if tag.storage_busy == 0 and tag in self._dropped_storing:
                    self._dropped_storing.discard(tag)
                    freed.append(tag.host_page)
                    tag.host_page = -1
        if freed:
            self.ctl.host.free(freed)

    @property
    def io_pending(self) -> bool:
        return self.ctl.busy

    def wait_io(self) -> None:
        """Wait until every copy and storage write issued so far is done, and apply them (flush,
        tests, benchmarks)."""
        self.ctl.flush_storage()
        self._apply_finished()

    # ---- backup ------------------------------------------------------------------------------
    def _wants_backup(self, node: Node) -> bool:
        return node.host_page < 0 and (self.threshold is None or node.hit_count >= self.threshold)

    def _alloc_host(self, n: int) -> list[int]:
        """Up to n host pages (idle host-only nodes evicted for them first)."""
        short = n - self.ctl.host.num_free_pages
        if short > 0:
            self._evict_host(short)
        return self.ctl.host.alloc(min(n, self.ctl.host.num_free_pages)) or []

    def _backup(self, nodes: list):
        """Start copying these device nodes (parents first) to new host pages, then to storage;
        the copy's completion handle (None: nothing copied). Nodes the host cannot take are
        skipped and counted."""
        nodes = [n for n in nodes if n.host_page < 0 and n.page >= 0]
        if not nodes:
            return None
        host_pages = self._alloc_host(len(nodes))
        self.ctl.counters.backup_skipped_pages += len(nodes) - len(host_pages)
        nodes = nodes[:len(host_pages)]
        if not nodes:
            return None
        store = []
        for n, hp in zip(nodes, host_pages):
            n.host_page = hp
            self.num_host_nodes += 1
            self._hold(n)
            if self.ctl.storage is not None:
                n.storage_busy += 1
                store.append(StoreRequest(n.hash, self._parent_hash(n), n.tokens, n))
        done = self.ctl.backup([n.page for n in nodes], host_pages, tag=nodes, store=store)
        for chain in self._chains(nodes):
            self._emit_stored(chain, HOST)
        self._apply_finished()  # done at once on CPU
        return done

    def _parent_hash(self, n: Node) -> int | None:
        return n.parent.hash if n.parent is not self.root else None

    @staticmethod
    def _chains(nodes: list) -> list[list]:
        """Nodes (parents first) split into parent-to-child runs."""
        out = []
        for n in nodes:
            if out and n.parent is out[-1][-1]:
                out[-1].append(n)
            else:
                out.append([n])
        return out

    def _on_device_nodes(self, nodes: list) -> None:
        for n in nodes:
            n.hit_count += 1
        if self.threshold is not None:
            self._backup([n for n in nodes if self._wants_backup(n)])

    def _revive(self, node: Node, page: int) -> None:
        node.page = page
        self.num_pages += 1
        if node.lock_ref == 0 and node.io_busy == 0:
            self.evictable_pages += 1

    # ---- admission: match and load back ------------------------------------------------------
    def match_and_load(self, token_ids, lora: str | None = None) -> tuple[list[int], Node, bool]:
        pages, node = self.match_prefix(token_ids, lora)
        ps = self.page_size
        host_nodes, walk = [], node
        i = len(pages)
        while (i + 1) * ps <= len(token_ids):
            child = walk.children.get(self.child_key(walk, tuple(token_ids[i * ps:(i + 1) * ps]), lora))
            if child is None:
                break
            host_nodes.append(child)
            walk, i = child, i + 1
        n_host = len(host_nodes)
        for n in host_nodes:  # host pages found for a storage read or device pages for the load must not take them
            self._hold(n)
        if self.ctl.storage is not None and (i + 1) * ps <= len(token_ids):
            read = self.ctl.prefetched(*self._chain(walk, token_ids, i, lora), self._alloc_host)
            if read is None:
                for n in host_nodes:
                    self._release(n)
                return pages, node, False  # the prefetch policy waits for the storage read
            for n in self._adopt_stored(walk, read, lora):
                if n.tokens != tuple(token_ids[i * ps:(i + 1) * ps]):
                    break  # the read followed another prompt's chain from here (kept as host nodes)
                self._hold(n)
                host_nodes.append(n)
                i += 1
        if not host_nodes:
            self._count_hits(node)
            return pages, node, True
        # Protect the device prefix too while device pages are found for the load.
        self.lock(node)
        short = len(host_nodes) - self.pool.num_free_pages
        if short > 0:
            self.evict(short)
        got = self.pool.alloc(min(len(host_nodes), self.pool.num_free_pages)) or []
        for n in host_nodes:
            self._release(n)
        self.unlock(node)
        loaded = host_nodes[:len(got)]
        if loaded:
            for n, p in zip(loaded, got):
                self._revive(n, p)
                n.last_access = next(_tick)
                self._hold(n)
            self.ctl.load_back([n.host_page for n in loaded], got, tag=loaded)
            self._emit_stored(loaded)
            from_host = min(len(loaded), n_host)
            self.ctl.counters.host_hit_tokens += from_host * ps
            self.ctl.counters.storage_hit_tokens += (len(loaded) - from_host) * ps
            pages += got
            node = loaded[-1]
            self._apply_finished()  # done at once on CPU
        self._count_hits(node)
        return pages, node, True

    def _chain(self, walk: Node, token_ids, i: int, lora: str | None = None):
        """The storage chain past ``walk`` (token block i on, under LoRA adapter ``lora``): its
        first key, and a callable returning [(key, parent key, tokens)] (hashed only when a read starts)."""
        ps = self.page_size
        first_tokens = tuple(token_ids[i * ps:(i + 1) * ps])
        first = block_hash(self.chain_hash(walk, lora), first_tokens)

        def chain() -> list:
            out, parent, j = [(first, walk.hash, first_tokens)], first, i + 1
            while (j + 1) * ps <= len(token_ids):
                toks = tuple(token_ids[j * ps:(j + 1) * ps])
                key = block_hash(parent, toks)
                out.append((key, parent, toks))
                parent, j = key, j + 1
            return out

        return first, chain

    def _adopt_stored(self, walk: Node, read: list, lora: str | None = None) -> list:
        """Pages read from storage into host pages ([(key, tokens, host page)], a chain under
        walk, of LoRA adapter ``lora``) become host nodes; returns them, parent first."""
        parent, out = walk, []
        for idx, (key, toks, hp) in enumerate(read):
            if self.child_key(parent, toks, lora) in parent.children:  # appeared meanwhile: ours is not needed
                self.ctl.host.free([h for _, _, h in read[idx:]])
                break
            child = self.new_node(parent, toks, lora, hash=key, host_page=hp, last_access=next(_tick))
            self.num_host_nodes += 1
            out.append(child)
            parent = child
        if out:
            self._emit_stored(out, HOST)
        return out

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
        """Free up to num_pages device pages, least recently used first (device -> host). Nodes
        whose copies are in flight stay."""
        self._apply_finished()
        if num_pages <= 0 or self.evictable_pages == 0:
            return 0
        victims = self._eviction_order(num_pages)
        # The write policy wants some on host before they leave: one backup, waited for (their
        # device pages are reused right after).
        done = self._backup([n for n in victims if self._wants_backup(n)])
        if done is not None:
            done.wait()
            self._apply_finished()
        freed, removed = [], []
        for n in victims:
            if not self._device_leaf(n):
                continue
            freed.append(n.page)
            removed.append(n.hash)
            n.page = -1
            self.num_pages -= 1
            self.evictable_pages -= 1
            if n.host_page < 0:
                self._drop(n)
        self.ctl.counters.evicted_tokens += len(freed) * self.page_size
        self._free_pages(freed)
        self._emit([BlockRemoved(block_hashes=removed)])
        return len(freed)

    def _eviction_order(self, num_pages: int) -> list:
        """Up to num_pages device nodes in the order eviction takes them: the least recently used
        leaf, again and again (a parent becomes a leaf once its device children are taken)."""
        heap = [(n.last_access, id(n), n) for n in self._all_nodes() if self._device_leaf(n)]
        heapq.heapify(heap)
        left: dict[int, int] = {}  # id(node) -> device children not taken yet
        out = []
        while heap and len(out) < num_pages:
            n = heapq.heappop(heap)[2]
            out.append(n)
            p = n.parent
            if p is self.root or p.page < 0 or p.lock_ref or p.io_busy:
                continue
            left[id(p)] = left.get(id(p), sum(c.page >= 0 for c in p.children.values())) - 1
            if left[id(p)] == 0:
                heapq.heappush(heap, (p.last_access, id(p), p))
        return out

    def _evict_host(self, num_pages: int) -> int:
        """Free up to num_pages host pages: idle childless nodes off the device leave the tree."""
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
        return (n is not self.root and n.page < 0 and n.host_page >= 0 and not n.children and n.io_busy == 0
                and n.storage_busy == 0)

    def _drop(self, n: Node) -> None:
        """Remove a node off the device, and its subtree (all off the device), from the tree. A
        host page still being written to storage is freed when the write is done."""
        stack, removed, freed = [n], [], []
        while stack:
            m = stack.pop()
            stack.extend(m.children.values())
            if m.host_page >= 0:
                self.num_host_nodes -= 1
                removed.append(m.hash)
                if m.storage_busy:
                    self._dropped_storing.add(m)
                else:
                    freed.append(m.host_page)
                    m.host_page = -1
        if freed:
            self.ctl.host.free(freed)
        del n.parent.children[n.key]
        if removed:
            self._emit([BlockRemoved(block_hashes=removed, tier=HOST)])

    def _all_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def reset(self) -> bool:
        """Drop every unlocked page on the device and the host (storage keeps its pages); waits
        for the copies and storage writes in flight first."""
        self.wait_io()
        reclaimed = self.ctl.drain_prefetch()
        if reclaimed:
            self.ctl.host.free(reclaimed)
        self.evict(self.evictable_pages)
        self.wait_io()  # write_back copied the evicted pages: to storage too
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
                                           list(n.tokens), self.page_size, tier, n.lora))
            stack.extend(n.children.values())
        return out
