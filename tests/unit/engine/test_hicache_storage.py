"""The file storage tier: pages move straight between files and host pool pages (either layout),
every read is checked, and --hicache-storage-max-bytes removes the oldest chains, tail first."""
from __future__ import annotations

import os

import pytest
import torch
from tandem.hicache import HostKVPool
from tandem.hicache.file_storage import FileStorage
from tandem.hicache.nixl_storage import NixlStorage
from tandem.hicache.storage_index import StorageIndex

SHAPE = dict(num_layers=3, num_pages=8, page_size=4, num_kv_heads=2, head_dim=5, dtype=torch.bfloat16)


def _host(layout: str) -> HostKVPool:
    host = HostKVPool(layout=layout, **SHAPE)
    host.buffer.copy_(torch.randn(host.buffer.shape))
    return host


@pytest.mark.parametrize("backend", [FileStorage, NixlStorage])
def test_pages_move_between_layouts_through_files(tmp_path, backend):
    """A page written from a layer_first pool reads back into a page_first pool byte for byte
    (the file holds [K/V, layer] order either way); the token ids and parent are checked."""
    store = backend(str(tmp_path), "ns")
    src, dst = _host("layer_first"), _host("page_first")
    toks = (1, 2, 3, 4)
    assert store.write(7, 5, toks, src.page_chunks(3)) == src.bytes_per_page
    assert store.write(7, 5, toks, src.page_chunks(3)) == 0  # already there
    assert store.read_into(7, 5, toks, dst.page_chunks(6))
    assert torch.equal(dst.page_data(6), src.page_data(3))
    assert not store.read_into(8, 5, toks, dst.page_chunks(0))  # absent
    assert not store.read_into(7, 5, (1, 2, 3, 5), dst.page_chunks(0))  # other tokens: a collision
    assert not store.exists(7) and store.num_corrupt == 1  # removed


def test_corrupt_or_truncated_pages_are_misses_and_removed(tmp_path):
    store = FileStorage(str(tmp_path), "ns")
    host = _host("page_first")
    for key in (1, 2):
        store.write(key, None, (key,) * 4, host.page_chunks(key))
    with open(store._path(1), "r+b") as f:  # noqa: SLF001
        f.seek(-7, os.SEEK_END)
        b = f.read(1)
        f.seek(-7, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    with open(store._path(2), "r+b") as f:  # noqa: SLF001
        f.truncate(100)
    assert not store.read_into(1, None, (1,) * 4, host.page_chunks(5))
    assert not store.read_into(2, None, (2,) * 4, host.page_chunks(5))
    assert store.num_corrupt == 2 and not store.exists(1) and not store.exists(2)


def test_index_evicts_least_recently_used_leaves_first():
    idx = StorageIndex(max_bytes=5)
    for key, parent in ((1, 0), (2, 1), (3, 2), (11, 0), (12, 11), (13, 12)):  # chains 1-2-3, 11-12-13
        idx.add(key, parent, 1)
    assert idx.victims() == [3]  # 6 pages > 5: the oldest chain's tail, not its root (2 continues it)
    idx.touch(1)
    idx.touch(2)  # chain 1-2 read again (parents first): now newer than 11-12-13
    idx.max_bytes = 2
    assert idx.victims() == [13, 12, 11]
    assert len(idx) == 2 and idx.total_bytes == 2


def test_size_limit_removes_oldest_chains_and_survives_restart(tmp_path):
    host = _host("layer_first")
    page = host.bytes_per_page + 32 + 4 * 8  # header + tokens + payload
    store = FileStorage(str(tmp_path), "ns", max_bytes=5 * page)
    chains = ([101, 102, 103], [201, 202, 203])
    for keys in chains:
        parent = None
        for k in keys:
            store.write(k, parent, (k,) * 4, host.page_chunks(0))
            parent = k
    assert store.used_bytes == 5 * page and store.num_evicted == 1
    assert not store.exists(103) and all(store.exists(k) for k in (101, 102, 201, 202, 203))
    assert sorted(os.listdir(store.dir)) == sorted(f"{k:016x}.kv" for k in (101, 102, 201, 202, 203))
    # Chain a read again: b is now the oldest; a new page pushes out b's tail.
    assert store.read_into(101, None, (101,) * 4, host.page_chunks(1))
    assert store.read_into(102, 101, (102,) * 4, host.page_chunks(1))
    store.write(301, None, (301,) * 4, host.page_chunks(0))
    assert not store.exists(203) and store.exists(102)
    # A restarted worker finds the folder's pages (ordered by modification time) and its limit.
    again = FileStorage(str(tmp_path), "ns", max_bytes=3 * page)
    assert again.used_bytes == 3 * page and len(os.listdir(again.dir)) == 3
