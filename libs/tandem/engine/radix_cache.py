"""Page-granular radix prefix cache with LRU eviction and KV events.

Each node holds exactly one full page of tokens (``page_size`` ids) and the pool
page holding their KV; a path from the root spells a prefix. Nodes referenced by
running requests are locked (``lock_ref > 0``); unlocked leaves are evicted in
least-recently-used order when the allocator runs dry.

Every node carries a chained 64-bit block hash, ``blake2b(parent_hash, tokens)``,
so equal hashes mean equal prefixes on any worker. Subscribers receive
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events.

The LoRA adapter is part of every key: a request under adapter ``a`` walks a subtree of its own
(the root's children are keyed ``(a, tokens)``, the base model's plain ``tokens``) and its first
block's hash is chained on ``lora_root_hash(a)`` instead of 0, so neither the tree, nor the
block hashes (KV events, the router's index, HiCache storage keys) ever equate adapter a's KV
with the base model's or adapter b's.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field


def block_hash(parent_hash: int | None, tokens) -> int:
    """Stable 64-bit hash of a token block chained on its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash or 0))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return int.from_bytes(h.digest(), "little")


def lora_root_hash(lora: str | None) -> int | None:
    """The parent hash of the first block under LoRA adapter ``lora`` (None: the base model);
    value-for-value ``tandem.routing.block_hash.lora_root_hash``."""
    if lora is None:
        return None
    h = hashlib.blake2b(b"tandem-lora\0" + lora.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


DEVICE, HOST = "device", "host"  # tiers of KV events (HOST only with HiCache)


@dataclass
class BlockStored:
    block_hashes: list
    parent_block_hash: int | None
    token_ids: list
    block_size: int
    tier: str = DEVICE
    lora_name: str | None = None  # the adapter whose KV these blocks hold (None: the base model)


@dataclass
class BlockRemoved:
    block_hashes: list
    tier: str = DEVICE


@dataclass
class AllBlocksCleared:
    pass


_tick = itertools.count()


@dataclass(eq=False)
class Node:
    tokens: tuple = ()
    key: object = None  # its key in parent.children: tokens, or (lora, tokens) for a first block under an adapter
    lora: str | None = None  # the LoRA adapter of its subtree (None: the base model)
    page: int = -1
    parent: Node | None = None
    children: dict = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    hash: int | None = None
    # HiCache (tandem.engine.hiradix_cache): page = -1 once the KV left the device tier.
    host_page: int = -1
    hit_count: int = 0
    io_busy: int = 0  # > 0 while a copy reads or fills this node's pages: no tier may drop it
    storage_busy: int = 0  # > 0 while its host page is written to storage: the host page stays


class RadixCache:
    def __init__(self, page_size: int, free_pages: Callable[[list], None], disabled: bool = False):
        self.page_size = page_size
        self._free_pages = free_pages
        self.disabled = disabled
        self.root = Node(lock_ref=1)
        self.num_pages = 0  # pages held by the tree
        self.evictable_pages = 0  # of those, unlocked
        self.subscribers: list[Callable[[list], None]] = []

    # ---- events --------------------------------------------------------------------------
    def subscribe(self, fn: Callable[[list], None]) -> None:
        """fn(events) is called on the engine thread with a list of event objects."""
        self.subscribers.append(fn)

    def _emit(self, events: list) -> None:
        if events:
            for fn in self.subscribers:
                fn(events)

    # ---- keys --------------------------------------------------------------------------------
    def child_key(self, node: Node, tokens: tuple, lora: str | None):
        """The key of the block ``tokens`` under ``node`` for requests of adapter ``lora``."""
        return (lora, tokens) if lora is not None and node is self.root else tokens

    def chain_hash(self, node: Node, lora: str | None) -> int | None:
        """The hash a block under ``node`` is chained on (the adapter's root hash at the root)."""
        return lora_root_hash(lora) if node is self.root else node.hash

    def new_node(self, parent: Node, tokens: tuple, lora: str | None, **fields) -> Node:
        """A node for block ``tokens`` under ``parent``, keyed and hashed for ``lora``, in the tree."""
        key = self.child_key(parent, tokens, lora)
        fields.setdefault("hash", block_hash(self.chain_hash(parent, lora), tokens))
        child = Node(tokens=tokens, key=key, lora=lora, parent=parent, **fields)
        parent.children[key] = child
        return child

    # ---- lookup / insert ---------------------------------------------------------------
    def match_prefix(self, token_ids, lora: str | None = None) -> tuple[list[int], Node]:
        """Pages of the longest cached full-page prefix of token_ids (under LoRA adapter
        ``lora``), and its last node."""
        node, pages = self.root, []
        if self.disabled:
            return pages, node
        ps = self.page_size
        for i in range(len(token_ids) // ps):
            child = node.children.get(self.child_key(node, tuple(token_ids[i * ps : (i + 1) * ps]), lora))
            if child is None or child.page < 0:  # only device pages match (HiCache loads the rest)
                break
            node = child
            node.last_access = next(_tick)
            pages.append(node.page)
        return pages, node

    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0 and node.io_busy == 0:  # a node in a copy was not counted evictable
                self.evictable_pages -= 1
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.io_busy == 0:
                self.evictable_pages += 1
            node = node.parent

    def insert(self, token_ids, pages: list[int], num_owned_from: int, lora: str | None = None) -> None:
        """Hand a request's pages to the tree.

        ``pages[i]`` holds the KV of tokens ``[i*ps, (i+1)*ps)``; pages before
        ``num_owned_from`` already belong to the tree (the request's matched prefix).
        Full pages become nodes (or are freed when an equal node appeared meanwhile);
        a trailing partial page is freed.
        """
        n_full = min(len(token_ids) // self.page_size, len(pages))
        if self.disabled:
            self._free_pages(list(pages[num_owned_from:]))
            return
        self._adopt(token_ids, pages, n_full, num_owned_from, list(pages[max(n_full, num_owned_from):]), lora)

    def insert_live(self, token_ids, pages: list[int], num_owned_from: int,
                    lora: str | None = None) -> tuple[list[int], Node]:
        """Hand the full pages of a request that keeps running to the tree now (its prompt, once
        prefilled), so that later requests with the same prefix share them at once.

        ``token_ids`` covers whole pages only. Returns the request's page list for these tokens
        (where the tree already held an equal block, the tree's page replaces the request's
        own, which is freed: same tokens, same KV) and the last node, which the caller must
        lock before anything can evict it.
        """
        n_full = len(token_ids) // self.page_size
        if n_full > len(pages):
            raise ValueError(f"insert_live: {n_full} full pages of tokens but {len(pages)} pages")
        return self._adopt(token_ids, pages, n_full, num_owned_from, [], lora)

    def _adopt(self, token_ids, pages: list[int], n_full: int, num_owned_from: int,
               to_free: list[int], lora: str | None = None) -> tuple[list[int], Node]:
        """Make pages[:n_full] tree nodes (an equal node already there keeps its page and ours is
        freed, with ``to_free``); return the pages now holding those tokens and the last node."""
        ps = self.page_size
        out, new_nodes, node = list(pages[:n_full]), [], self.root
        for i in range(n_full):
            tokens = tuple(token_ids[i * ps : (i + 1) * ps])
            child = node.children.get(self.child_key(node, tokens, lora))
            if child is None:
                if i < num_owned_from:  # our matched prefix was evicted? never: it is locked
                    raise RuntimeError("radix cache: locked prefix missing")
                child = self.new_node(node, tokens, lora, page=pages[i])
                self.num_pages += 1
                self.evictable_pages += 1
                new_nodes.append(child)
            elif i >= num_owned_from and child.page < 0:  # its KV left the device: ours holds it again
                self._revive(child, pages[i])
                new_nodes.append(child)
            elif i >= num_owned_from and child.page != pages[i]:
                to_free.append(pages[i])
                out[i] = child.page
            child.last_access = next(_tick)
            node = child
        if to_free:
            self._free_pages(to_free)
        self._emit_stored(new_nodes)
        self._on_device_nodes(new_nodes)
        return out, node

    def _emit_stored(self, chain: list, tier: str = DEVICE) -> None:
        """One BlockStored event for a parent-to-child chain of nodes now in a tier."""
        if chain:
            first = chain[0]
            self._emit([BlockStored(
                block_hashes=[n.hash for n in chain],
                parent_block_hash=first.parent.hash if first.parent is not self.root else None,
                token_ids=[t for n in chain for t in n.tokens],
                block_size=self.page_size,
                tier=tier,
                lora_name=first.lora,
            )])

    def _revive(self, node: Node, page: int) -> None:
        """A node whose KV left the device gets a device page again (only with HiCache)."""
        raise RuntimeError("radix cache: a node without a device page exists only with HiCache")

    def _on_device_nodes(self, nodes: list) -> None:
        """Hook: nodes whose KV has just been computed on the device (HiCache backs them up)."""

    def poll(self) -> None:
        """Hook, once per scheduling step: HiCache applies the page copies that finished."""

    @property
    def io_pending(self) -> bool:
        """Page copies in flight hold pages that will be evictable once done (HiCache)."""
        return False

    def match_and_load(self, token_ids, lora: str | None = None) -> tuple[list[int], Node, bool]:
        """match_prefix for admission: with HiCache, the prefix found below the device tier is
        loaded back first. The flag is False while the request should wait (storage prefetch)."""
        return *self.match_prefix(token_ids, lora), True

    # ---- eviction ------------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Free up to num_pages unlocked pages, least recently used leaves first."""
        if num_pages <= 0 or self.evictable_pages == 0:
            return 0
        heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed, removed = [], []
        while heap and len(freed) < num_pages:
            _, _, n = heapq.heappop(heap)
            parent = n.parent
            del parent.children[n.key]
            freed.append(n.page)
            removed.append(n.hash)
            self.num_pages -= 1
            self.evictable_pages -= 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self._free_pages(freed)
        self._emit([BlockRemoved(block_hashes=removed)])
        return len(freed)

    def _leaves(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            if not n.children and n is not self.root:
                yield n
            stack.extend(n.children.values())

    def reset(self) -> bool:
        """Drop every unlocked page (all of them when no request holds any). True if the tree is empty."""
        self.evict(self.evictable_pages)
        empty = not self.root.children
        if empty:
            self._emit([AllBlocksCleared()])
        return empty

    def snapshot(self) -> list[BlockStored]:
        """The stored blocks as BlockStored events, parents first (for a new subscriber)."""
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(BlockStored([n.hash], n.parent.hash if n.parent is not self.root else None,
                                   list(n.tokens), self.page_size, lora_name=n.lora))
            stack.extend(n.children.values())
        return out
