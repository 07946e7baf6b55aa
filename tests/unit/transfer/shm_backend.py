"""A transfer backend over shared memory between processes, written from the recipe in
libs/tandem/transfer/README.md; it runs the suite every backend runs (test_backend_suite.py).
The receiver's tensors live in files under /dev/shm; its registration says where (from
/proc/self/maps). The sender maps those files and copies pages straight in, like an RDMA
WRITE, then sends a KvPages notice; the aux row travels in band."""
from __future__ import annotations

import ctypes
import json
import mmap

from tandem import transfer as t


def shm_regions(buffers) -> list[tuple[int, int, str, int]]:
    """(address, bytes, file, offset in the file) of every K, V and aux tensor."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/dev/shm/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi, int(parts[2], 16), parts[5]))
    out = []
    for buf in [*buffers.k, *buffers.v, buffers.aux]:
        addr, n = buf.data_ptr(), buf.numel() * buf.element_size()
        m = next((m for m in maps if m[0] <= addr and addr + n <= m[1]), None)
        if m is None:
            raise ValueError("the shm backend needs KV buffers in files under /dev/shm "
                             "(torch.from_file(path, shared=True, ...))")
        out.append((addr, n, m[3], m[2] + addr - m[0]))
    return out


class ShmKvSender(t.KvSender):
    backend = "shm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._maps: dict[str, tuple[list[mmap.mmap], list[tuple[int, int, int]]]] = {}

    def _add_peer(self, reg) -> None:
        files, regions = {}, []
        for addr, n, path, offset in json.loads(reg.agent_metadata):
            if path not in files:
                with open(path, "r+b") as f:
                    files[path] = mmap.mmap(f.fileno(), 0)
            base = ctypes.addressof(ctypes.c_char.from_buffer(files[path]))
            regions.append((addr, n, base + offset))
        self._maps[reg.agent_name] = (list(files.values()), regions)

    def _remove_peer(self, peer: str) -> None:
        for m in self._maps.pop(peer)[0]:
            m.close()

    def _mapped(self, peer: str, addr: int, n: int) -> int:
        for start, size, local in self._maps[peer][1]:
            if start <= addr and addr + n <= start + size:
                return local + addr - start
        raise ValueError(f"address {addr:#x} is outside the buffers {peer} registered")

    def _send_kv(self, room, peer, remote, src, dst, chunk_index, is_last) -> t.TransferHandle:
        s, d = t.run_descriptors(self.layout, remote, t.merge_page_runs(src, dst))
        for (src_addr, n, _), (dst_addr, _, _) in zip(s.tolist(), d.tolist()):
            ctypes.memmove(self._mapped(peer, dst_addr, n), src_addr, n)
        notice = t.KvPages(room, chunk_index, tuple(dst.tolist()), is_last)
        return t.TransferHandle(room, peer, t.HandleKind.KV, int(s[:, 1].sum()) if len(s) else 0, chunk_index,
                              is_last, messages=[notice], backend_state=t.XferState.DONE)

    def _send_aux(self, room, peer, remote, aux_slot, row) -> t.TransferHandle:
        return t.inband_aux(room, peer, row)

    def _check(self, h: t.TransferHandle) -> t.XferStatus:
        return t.XferStatus(h.backend_state)


class ShmKvReceiver(t.KvReceiver):
    backend = "shm"

    def agent_metadata(self) -> bytes:
        return json.dumps(shm_regions(self.buffers)).encode()

    def _on_pages(self, r, msg: t.KvPages) -> None:
        if msg.k or msg.v or msg.layer is not None:
            self._reject(r, f"room {r.room}: shm pages are written in place, not sent")
        self._mark_covered(r, msg, self._covered_pages(r, msg))

    def _room_complete(self, r) -> bool:
        return bool(r.coverage.all())
