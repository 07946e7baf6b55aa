"""The ``nixl`` storage tier: the ``file`` tier's files and checks, with each page's KV bytes
moved between host memory and the file by NIXL's POSIX plugin (DRAM_SEG <-> FILE_SEG)."""
from __future__ import annotations

import os

import torch

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
    def __init__(self, root: str, namespace: str):
        super().__init__(root, namespace)
        self.agent = nixl_posix_agent(f"tandem-hicache-{os.getpid()}-{id(self):x}")

    def _move(self, op: str, buf: torch.Tensor, fd: int, offset: int) -> None:
        n = buf.numel()
        if n == 0:
            return
        dram = self.agent.register_memory([(buf.data_ptr(), n, 0, "")], "DRAM")
        file = self.agent.register_memory([(offset, n, fd, "")], "FILE")
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
            raise OSError(f"NIXL POSIX {op} of {n} bytes at offset {offset}: {state}")

    def _write_payload(self, f, offset: int, payload: torch.Tensor) -> None:
        self._move("WRITE", payload.contiguous(), f.fileno(), offset)

    def _read_payload(self, f, offset: int, n: int) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.uint8)
        self._move("READ", buf, f.fileno(), offset)
        return buf
