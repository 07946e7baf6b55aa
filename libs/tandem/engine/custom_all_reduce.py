"""Custom all-reduce for small TP messages on one node: one-shot over peer-to-peer device buffers.

Decode's all-reduces are small (``batch x hidden`` values after every ``o_proj`` and
``down_proj``), where NCCL's latency dominates. As SGLang's and vLLM's custom all-reduce, each
rank allocates once a staging buffer and a signal buffer on its GPU and opens every peer's two
buffers through CUDA IPC (handles exchanged over the worker's gloo group). An all-reduce then
copies the input into this rank's staging buffer and launches one kernel
(``tandem.engine.kernels.all_reduce``) that waits on flags in device memory until every rank has
staged its input, sums every rank's buffer in rank order into the output (so every rank gets
bitwise the same result) and waits again before returning. The flags count on in device memory,
so the copy and the kernel are captured in a decode CUDA graph like any other kernel.

Selection (``CustomAllReduce.can_reduce``): a contiguous float32 / float16 / bfloat16 CUDA tensor
on this rank's device of at most ``max_bytes`` (default 512 KiB); anything else goes to NCCL
(``TensorParallel.all_reduce``). Every rank makes the same choice: it depends only on the
tensor's shape and dtype, which TP ranks share.

It is opened (``open_custom_all_reduce``) when every rank asks for it (``--disable-custom-all-reduce``
not given, CUDA, TP > 1), every rank is on the same host, each pair of devices can access each
other (peer-to-peer), and every rank could open every peer's buffers; otherwise no rank uses it and
the log says why. NVLink multicast is not used.
"""
from __future__ import annotations

import logging
import socket

import torch
import torch.distributed as dist

__all__ = ["CustomAllReduce", "open_custom_all_reduce", "DEFAULT_MAX_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CustomAllReduce:
    """One rank's view of every rank's staging buffer (uint8, ``max_bytes``) and signal buffer
    (int32, ``SIGNAL_WORDS``, zeroed before first use), index = rank. The buffers may be any
    memory the kernel can address: peers' device memory opened through CUDA IPC on a GPU, shared
    CPU tensors under the Triton interpreter in the tests."""

    def __init__(self, rank: int, staging: list[torch.Tensor], signals: list[torch.Tensor], max_spin: int | None = None):
        from .kernels import all_reduce as kernel

        self._kernel = kernel
        if not 2 <= len(staging) <= kernel.MAX_RANKS or len(signals) != len(staging):
            raise ValueError(f"{len(staging)} staging and {len(signals)} signal buffers: need one of each per rank, "
                             f"2..{kernel.MAX_RANKS} ranks")
        if not 0 <= rank < len(staging):
            raise ValueError(f"rank {rank} is outside [0, {len(staging)})")
        self.rank, self.world_size = rank, len(staging)
        self.staging, self.signals = staging, signals
        self.max_bytes = min(t.numel() * t.element_size() for t in staging)
        self.device = staging[rank].device
        self.max_spin = kernel.DEFAULT_MAX_SPIN if max_spin is None else max_spin
        self._views: dict[torch.dtype, list[torch.Tensor]] = {}
        self.calls = 0  # all-reduces launched (eager or captured), for tests and stats

    def can_reduce(self, t: torch.Tensor) -> bool:
        """Whether ``t`` goes through this all-reduce (else NCCL); the same answer on every rank."""
        return (t.device == self.device and t.dtype in _DTYPES and t.is_contiguous()
                and 0 < t.numel() * t.element_size() <= self.max_bytes)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (every rank calls it with the same shape); returns ``t``."""
        if not self.can_reduce(t):
            raise ValueError(f"custom all-reduce: a {t.dtype} tensor of {t.numel() * t.element_size()} bytes on "
                             f"{t.device} (contiguous: {t.is_contiguous()}); it takes contiguous float32/float16/"
                             f"bfloat16 on {self.device} up to {self.max_bytes} bytes")
        views = self._views.get(t.dtype)
        if views is None:
            views = self._views[t.dtype] = [b.view(t.dtype) for b in self.staging]
        flat = t.view(-1)
        views[self.rank][:flat.numel()].copy_(flat)
        self._kernel.all_reduce_launch(flat, views, self.signals, self.rank, self.max_spin)
        self.calls += 1
        return t

    def status(self) -> torch.Tensor:
        """This rank's status word (a 1-element int32 view of its signal buffer): nonzero, and left so,
        once a barrier gave up waiting for a peer; that call's output was left unsummed."""
        word = self._kernel.STATUS_WORD
        return self.signals[self.rank][word:word + 1]

    def failed(self) -> bool:
        """Whether a barrier of this rank gave up waiting for a peer (reads device memory: syncs)."""
        return bool(self.status().item())

    def close(self) -> None:
        """Drop the peers' buffers (closes their IPC mappings once collected) and this rank's."""
        self.staging, self.signals, self._views = [], [], {}


def open_custom_all_reduce(rank: int, world_size: int, device: torch.device, cpu_group, enabled: bool = True,
                           max_bytes: int = DEFAULT_MAX_BYTES) -> CustomAllReduce | None:
    """Collective over ``cpu_group`` (gloo; every rank of the worker calls it): the custom all-reduce
    of this rank, or None on every rank unless all of them can use it (see the module docstring)."""
    def gather(obj) -> list:
        out = [None] * world_size
        dist.all_gather_object(out, obj, group=cpu_group)
        return out

    why = None
    if not enabled:
        why = "disabled (--disable-custom-all-reduce, or TP size 1)"
    elif device.type != "cuda":
        why = f"device {device} is not CUDA"
    else:
        try:
            from .kernels.all_reduce import MAX_RANKS, SIGNAL_WORDS
        except ImportError as exc:
            why = f"its kernel needs triton: {exc}"
        else:
            if not 2 <= world_size <= MAX_RANKS:
                why = f"{world_size} ranks (it takes 2..{MAX_RANKS})"
    infos = gather((why, socket.gethostname(), device.index))
    reasons = [f"rank {r}: {w}" for r, (w, _, _) in enumerate(infos) if w is not None]
    if len({host for _, host, _ in infos}) > 1:
        reasons.append("the ranks are on more than one host")
    if reasons:
        log.info("custom all-reduce off, NCCL for every all-reduce: %s", "; ".join(reasons))
        return None
    # Peer access to every other device; the handles of this rank's buffers.
    mine = device.index
    no_p2p = [d for _, _, d in infos if d != mine and not torch.cuda.can_device_access_peer(mine, d)]
    handles = None
    staging = torch.zeros(max_bytes, dtype=torch.uint8, device=device)
    signal = torch.zeros(SIGNAL_WORDS, dtype=torch.int32, device=device)
    torch.cuda.synchronize(device)  # zeroed before any peer can write a flag into it
    if no_p2p:
        why = f"cuda:{mine} cannot access cuda:{no_p2p} peer-to-peer"
    else:
        try:
            handles = (_ipc_handle(staging), _ipc_handle(signal))
        except Exception as exc:  # IPC unsupported here: NCCL for all
            why = f"CUDA IPC handle: {type(exc).__name__}: {exc}"
    shared = gather((why, handles))
    # Open every peer's buffers.
    bufs, sigs = [], []
    if all(w is None for w, _ in shared):
        try:
            for r, (_, (h_buf, h_sig)) in enumerate(shared):
                bufs.append(staging if r == rank else _ipc_open(h_buf))
                sigs.append(signal if r == rank else _ipc_open(h_sig))
            torch.cuda.synchronize(device)
        except Exception as exc:
            why = f"opening a peer's buffers: {type(exc).__name__}: {exc}"
    opened = gather(why)
    reasons = [f"rank {r}: {w}" for r, w in enumerate(opened) if w is not None]
    if reasons:
        log.warning("custom all-reduce off, NCCL for every all-reduce: %s", "; ".join(reasons))
        return None
    log.info("custom all-reduce on: rank %d of %d, messages up to %d bytes (larger ones: NCCL)",
             rank, world_size, max_bytes)
    return CustomAllReduce(rank, bufs, sigs)


def _ipc_handle(t: torch.Tensor) -> tuple:
    """A picklable handle another process on this host opens with ``_ipc_open`` (torch's CUDA IPC)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(t)


def _ipc_open(handle: tuple) -> torch.Tensor:
    rebuild, args = handle
    return rebuild(*args)
