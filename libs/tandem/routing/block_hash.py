"""Chained hashes of token blocks (KV pages), shared by the engine's radix cache events
and the router's KV index.

The hash of block i covers the hash of block i-1 and the block's token ids, so two equal
hashes mean two equal prefixes. Only full blocks are hashed: a partial last block is never
shared by the prefix cache.

Hash: BLAKE2b with an 8-byte digest over (parent hash as uint64 little-endian, 0 for the first
block; then every token as int64 little-endian), read back as a little-endian uint64. It is
stable across processes and Python versions (unlike `hash()`), and value-for-value the same as
the engine's `tandem.engine.radix_cache.block_hash` (a unit test checks it), without importing
the engine (and torch) into the router.
"""
from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

# Parent "hash" of the first block of a sequence.
ROOT_HASH = 0
_LITTLE = sys.byteorder == "little"


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("q", tokens)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def hash_block(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of one block given its parent's hash (None or ROOT_HASH for the first block)."""
    h = blake2b(digest_size=8)
    h.update((parent or ROOT_HASH).to_bytes(8, "little"))
    h.update(_token_bytes(tokens))
    return int.from_bytes(h.digest(), "little")


def lora_root_hash(lora: str | None) -> int | None:
    """The parent hash of a sequence's first block under LoRA adapter ``lora`` (None: the base
    model, ROOT_HASH): the same tokens under two adapters never get equal hashes. Value-for-value
    the engine's ``tandem.engine.radix_cache.lora_root_hash``."""
    if lora is None:
        return None
    return int.from_bytes(blake2b(b"tandem-lora\0" + lora.encode(), digest_size=8).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of every full block of `token_ids` (a trailing partial block is skipped)."""
    if block_size <= 0:
        raise ValueError(f"block_size={block_size}: must be > 0")
    out: list[int] = []
    prev = parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash_block(prev, token_ids[start:start + block_size])
        out.append(prev)
    return out
