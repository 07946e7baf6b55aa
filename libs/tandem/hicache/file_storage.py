"""The ``file`` storage tier: one file per page, named by the page's chained block hash.

A file holds a header (magic, version, token count, payload length, the parent page's key, a
CRC-32 of the payload), the page's token ids and its K/V bytes in ``[K/V, layer]`` order. On
every read the token ids, the parent key and the CRC are checked: a truncated, corrupt or
colliding file is a miss (the caller recomputes), never wrong KV. Files are written to a
temporary name and renamed, so a crash mid-write leaves no half page under a real name. The
folder survives worker restarts; a subfolder per KV shape (``namespace``) keeps models apart.

A page moves between its file and the caller's memory (the pinned host pool's pages) in one
``preadv`` / ``pwritev`` of the whole file (header, tokens and payload: one disk request for a
cold page): no staging copy, and the GIL is released for the whole system call and the CRC
(zlib releases it on large buffers), so several reader threads run in parallel. Version-1
files (blake2b digests) are misses and are rewritten.

``max_bytes`` (``--hicache-storage-max-bytes``; 0: no limit) bounds the folder: after each
write the oldest chains are removed (``StorageIndex``). The limit counts the pages this worker
knows of: those found at start and those it wrote or read since.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import zlib

import numpy as np
import torch

from .storage_index import StorageIndex

log = logging.getLogger(__name__)

_MAGIC = b"TDKV"
_VERSION = 2
_HEADER = struct.Struct("<4sIIQQI")  # magic, version, num_tokens, payload bytes, parent key, crc32
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def _arrays(chunks: list[torch.Tensor]) -> list[np.ndarray]:
    return [c.numpy() for c in chunks if c.numel()]


def _crc(arrays: list[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(a, crc)
    return crc


def _vectored(op, fd: int, buffers: list, offset: int, what: str) -> None:
    """Move every buffer (in order) from or to the file at offset with ``op`` (os.preadv or
    os.pwritev), again while a call moves less than asked."""
    views = [memoryview(b).cast("B") for b in buffers]
    i = 0
    while i < len(views):
        n = op(fd, views[i:i + _IOV_MAX], offset)
        if n == 0:
            raise OSError(f"{what} made no progress at offset {offset}")
        offset += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def preadv_all(fd: int, buffers: list, offset: int) -> None:
    """Fill every buffer from the file at offset (OSError at end of file)."""
    _vectored(os.preadv, fd, buffers, offset, "read")


def pwritev_all(fd: int, buffers: list, offset: int) -> None:
    """Write every buffer to the file at offset."""
    _vectored(os.pwritev, fd, buffers, offset, "write")


class FileStorage:
    def __init__(self, root: str, namespace: str, max_bytes: int = 0):
        self.dir = os.path.join(root, namespace)
        os.makedirs(self.dir, exist_ok=True)
        self.num_corrupt = 0  # files found unreadable (and removed)
        self.num_evicted = 0  # files removed to stay under max_bytes
        self._lock = threading.Lock()
        self.index = StorageIndex(max_bytes) if max_bytes else None
        if self.index is not None:
            self.index.load(self._scan())
            self._evict()

    def _path(self, key: int) -> str:
        return os.path.join(self.dir, f"{key:016x}.kv")

    def _scan(self) -> list[tuple[int, int, int, float]]:
        """(key, parent, file bytes, mtime) of every page file in the folder."""
        out = []
        for entry in os.scandir(self.dir):
            if not entry.name.endswith(".kv"):
                continue
            try:
                with open(entry.path, "rb") as f:
                    head = f.read(_HEADER.size)
                st = entry.stat()
                magic, version, _, _, parent, _ = _HEADER.unpack(head)
                if magic == _MAGIC and version == _VERSION:
                    out.append((int(entry.name[:-3], 16), parent, st.st_size, st.st_mtime))
            except (OSError, ValueError, struct.error):
                continue
        return out

    @property
    def used_bytes(self) -> int | None:
        """Bytes of the pages this worker knows of (None without a size limit)."""
        return self.index.total_bytes if self.index is not None else None

    def exists(self, key: int) -> bool:
        if self.index is not None:
            with self._lock:
                if key in self.index:
                    return True
        return os.path.exists(self._path(key))

    def write(self, key: int, parent: int | None, tokens, chunks: list[torch.Tensor]) -> int:
        """Store a page (its payload: ``chunks``, contiguous uint8 tensors, in order); returns the
        payload bytes written (0 if the page was there already)."""
        path = self._path(key)
        tok = np.asarray(tokens, dtype=np.int64).tobytes()
        arrays = _arrays(chunks)
        n = sum(a.nbytes for a in arrays)
        try:
            if os.path.getsize(path) == _HEADER.size + len(tok) + n:
                self._remember(key, parent, _HEADER.size + len(tok) + n)
                return 0  # already there (a corrupt one is found and removed on read)
        except FileNotFoundError:
            pass
        head = _HEADER.pack(_MAGIC, _VERSION, len(tokens), n, parent or 0, _crc(arrays)) + tok
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_all(fd, head, arrays)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._remember(key, parent, len(head) + n)
        return n

    def read_into(self, key: int, parent: int | None, tokens, chunks: list[torch.Tensor]) -> bool:
        """Fill ``chunks`` (contiguous uint8 tensors, the page's payload in order) with the page
        stored under key for these tokens and this parent; False (a miss) if it is absent or
        fails its checks (then it is removed)."""
        path = self._path(key)
        tok = np.asarray(tokens, dtype=np.int64).tobytes()
        arrays = _arrays(chunks)
        want = sum(a.nbytes for a in arrays)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            head = bytearray(_HEADER.size + len(tok))
            if size != len(head) + want:
                why = "truncated or of another shape"
            else:
                self._read_all(fd, head, arrays)  # one read of the whole file
                why = self._check_head(bytes(head), tok, parent or 0, want)
                if why is None and _crc(arrays) != _HEADER.unpack_from(head)[5]:
                    why = "checksum mismatch"
        except OSError as e:
            why = f"unreadable ({e})"
        finally:
            os.close(fd)
        if why is not None:
            log.warning("hicache storage: %s %s: treated as a miss and removed", path, why)
            with self._lock:
                self.num_corrupt += 1
            self._forget(key)
            return False
        if self.index is not None:
            with self._lock:
                if key in self.index:
                    self.index.touch(key)
                else:
                    self.index.add(key, parent or 0, size)  # written by another process
        return True

    # A page moves through these two (the nixl backend moves the payload with NIXL's POSIX plugin).
    def _write_all(self, fd: int, head: bytes, arrays: list[np.ndarray]) -> None:
        pwritev_all(fd, [head, *arrays], 0)

    def _read_all(self, fd: int, head: bytearray, arrays: list[np.ndarray]) -> None:
        preadv_all(fd, [np.frombuffer(head, dtype=np.uint8), *arrays], 0)

    def _remember(self, key: int, parent: int | None, size: int) -> None:
        if self.index is not None:
            with self._lock:
                self.index.add(key, parent or 0, size)
            self._evict()

    def _evict(self) -> None:
        with self._lock:
            victims = self.index.victims()
            self.num_evicted += len(victims)
        for key in victims:
            self._remove(self._path(key))

    def _forget(self, key: int) -> None:
        if self.index is not None:
            with self._lock:
                self.index.remove(key)
        self._remove(self._path(key))

    @staticmethod
    def _check_head(head: bytes, tok: bytes, parent: int, want: int) -> str | None:
        magic, version, n_tok, n_payload, stored_parent, _ = _HEADER.unpack_from(head)
        if magic != _MAGIC or version != _VERSION:
            return "bad magic or version"
        if n_tok * 8 != len(tok) or n_payload != want:
            return "shape differs"
        if head[_HEADER.size:] != tok or stored_parent != parent:
            return "holds another page (hash collision)"
        return None

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass
