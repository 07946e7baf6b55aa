"""The ``file`` storage tier: one file per page, named by the page's chained block hash.

A file holds a header (magic, version, token count, payload length, digest), the page's token
ids and its K/V bytes. The digest (blake2b over tokens and payload) and the token ids are
checked on every read: a truncated, corrupt or colliding file is a miss (the caller
recomputes), never wrong KV. Files are written to a temporary name and renamed, so a crash
mid-write leaves no half page under a real name. The folder survives worker restarts; a
subfolder per KV shape (``namespace``) keeps models apart.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct

import numpy as np
import torch

log = logging.getLogger(__name__)

_MAGIC = b"TDKV"
_VERSION = 1
_HEADER = struct.Struct("<4sIIQ16s")  # magic, version, num_tokens, payload bytes, digest


def _digest(tokens: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokens)
    h.update(payload)
    return h.digest()


class FileStorage:
    def __init__(self, root: str, namespace: str):
        self.dir = os.path.join(root, namespace)
        os.makedirs(self.dir, exist_ok=True)
        self.num_corrupt = 0  # files found unreadable (and removed)

    def _path(self, key: int) -> str:
        return os.path.join(self.dir, f"{key:016x}.kv")

    def exists(self, key: int) -> bool:
        return os.path.exists(self._path(key))

    def put(self, key: int, tokens, data: torch.Tensor) -> int:
        """Store a page (any contiguous tensor); returns the bytes written (0 if already there)."""
        path = self._path(key)
        tok = np.asarray(tokens, dtype=np.int64).tobytes()
        payload = data.contiguous().view(torch.uint8).reshape(-1)
        n = payload.numel()
        try:
            if os.path.getsize(path) == _HEADER.size + len(tok) + n:
                return 0  # already there (a corrupt one is found and removed on read)
        except FileNotFoundError:
            pass
        digest = _digest(tok, payload.numpy().tobytes())
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, len(tokens), n, digest))
            f.write(tok)
            f.flush()
            self._write_payload(f, _HEADER.size + len(tok), payload)
        os.replace(tmp, path)
        return n

    def get(self, key: int, tokens, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        """The page stored under key for these tokens, or None (absent, or failed its checks)."""
        path = self._path(key)
        tok = np.asarray(tokens, dtype=np.int64).tobytes()
        want = int(np.prod(shape)) * dtype.itemsize
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(_HEADER.size + len(tok))
                why = self._check_head(head, tok, want, size)
                payload = None
                if why is None:
                    payload = self._read_payload(f, len(head), want)
                    if _digest(tok, payload.numpy().tobytes()) != _HEADER.unpack_from(head)[4]:
                        why = "digest mismatch"
        except FileNotFoundError:
            return None
        if why is not None:
            log.warning("hicache storage: %s %s: treated as a miss and removed", path, why)
            self.num_corrupt += 1
            self._remove(path)
            return None
        return payload.view(dtype).view(shape)

    # The payload moves through these two (the nixl backend moves it with NIXL's POSIX plugin).
    def _write_payload(self, f, offset: int, payload: torch.Tensor) -> None:
        f.write(payload.numpy().tobytes())

    def _read_payload(self, f, offset: int, n: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(f.read(n)), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def _check_head(head: bytes, tok: bytes, want: int, size: int) -> str | None:
        if len(head) < _HEADER.size:
            return "truncated header"
        magic, version, n_tok, n_payload, _ = _HEADER.unpack_from(head)
        if magic != _MAGIC or version != _VERSION:
            return "bad magic or version"
        if n_tok * 8 != len(tok) or n_payload != want:
            return "shape differs"
        if size != _HEADER.size + len(tok) + n_payload:
            return "truncated"
        if head[_HEADER.size:] != tok:
            return "holds other tokens (hash collision)"
        return None

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass
