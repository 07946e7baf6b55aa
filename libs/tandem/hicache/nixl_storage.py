"""The ``nixl`` storage tier: the ``file`` tier's files and checks, with each page's KV bytes
moved between host memory and the file by NIXL's POSIX plugin (DRAM_SEG <-> FILE_SEG), one
transfer per page (one descriptor per contiguous piece of the page in the host pool). GDS (file
<-> GPU memory) is not available on these machines: this is the code path, tested on CPU."""
from __future__ import annotations

import os
import threading

import numpy as np

from .file_storage import FileStorage


def nixl_posix_agent(name: str):
    """A NIXL agent with the POSIX backend; ValueError (one line) when NIXL cannot give one."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise ValueError(f"hicache_storage_backend=nixl: the nixl package does not import ({e})") from None
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    plugins = agent.get_plugin_list()
    if "POSIX" not in plugins:
        raise ValueError(f"hicache_storage_backend=nixl: NIXL has no POSIX plugin here (plugins: {', '.join(plugins)})")
    agent.create_backend("POSIX")
    return agent


class NixlStorage(FileStorage):
    def __init__(self, root: str, namespace: str, max_bytes: int = 0):
        super().__init__(root, namespace, max_bytes)
        self.agent = nixl_posix_agent(f"tandem-hicache-{os.getpid()}-{id(self):x}")
        self._agent_lock = threading.Lock()  # one transfer at a time through the agent

    def _move(self, op: str, arrays: list[np.ndarray], fd: int, offset: int) -> None:
        """One NIXL transfer between the arrays (in order) and the file from offset."""
        if not arrays:
            return
        dram_descs, file_descs = [], []
        for a in arrays:
            dram_descs.append((a.ctypes.data, a.nbytes, 0, ""))
            file_descs.append((offset, a.nbytes, fd, ""))
            offset += a.nbytes
        with self._agent_lock:
            dram = self.agent.register_memory(dram_descs, "DRAM")
            file = self.agent.register_memory(file_descs, "FILE")
            try:
                handle = self.agent.initialize_xfer(op, dram.trim(), file.trim(), self.agent.name)
                try:
                    state = self.agent.transfer(handle)
                    while state == "PROC":
                        state = self.agent.check_xfer_state(handle)
                finally:
                    self.agent.release_xfer_handle(handle)
            finally:
                self.agent.deregister_memory(file)
                self.agent.deregister_memory(dram)
        if state != "DONE":
            raise OSError(f"NIXL POSIX {op} of {sum(a.nbytes for a in arrays)} bytes: {state}")

    def _write_all(self, fd: int, head: bytes, arrays: list[np.ndarray]) -> None:
        os.pwrite(fd, head, 0)
        self._move("WRITE", arrays, fd, len(head))

    def _read_all(self, fd: int, head: bytearray, arrays: list[np.ndarray]) -> None:
        if os.preadv(fd, [head], 0) != len(head):
            raise OSError("short read of the page header")
        self._move("READ", arrays, fd, len(head))
