"""KV pool description, the pool layout two workers exchange, page checks and page runs.

Everything here is backend-neutral: every backend computes where page ``p`` of layer ``l``
lives with the same code, so they all write into the same bytes. :class:`PoolLayout` is
the library's own description of a pool (the worker maps it to ``tandem.v1.KvLayout``).

Pool shape (owned by the engine): per layer one contiguous K tensor and one contiguous V
tensor of shape ``[num_pages, page_size, kv_heads, head_dim]``; page ``p`` of layer ``l``
is the byte range ``[base_l + p * bytes_per_page, base_l + (p + 1) * bytes_per_page)``.

FP8 pools (``float8_e4m3fn`` / ``float8_e5m2``) carry one K and one V dequantization scale per
layer: pages move as their bytes, so both sides must hold the same dtype and the same scales.

Tensor parallelism: a worker of ``tp_size`` ranks has one pool per rank, holding the model's KV
heads ``[kv_head_start, kv_head_start + kv_heads)`` of ``total_kv_heads`` (KV heads replicated
over ranks when the model has fewer than ``tp_size``). Prefill rank ``p`` writes into decode rank
``d`` the heads both hold (:func:`head_slice`; a head replicated on prefill is written by its
lowest rank only); inside a page a token's heads are contiguous, so a head slice is
``page_size`` byte ranges per page (:func:`slice_descriptors`), or whole pages when both pools
hold exactly the same heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .aux import AUX_MIN_SLOT_BYTES

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int8: "int8",
    torch.uint8: "uint8",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


_FP8_NAMES = ("float8_e4m3fn", "float8_e5m2")
# What the user changes to make two workers agree, for the fields a flag sets.
_MISMATCH_HINTS = {
    "dtype": "prefill and decode need the same --kv-cache-dtype (and --dtype)",
    "k_scales": "prefill and decode need the same FP8 KV scales: the same checkpoint, or the same "
                "--kv-cache-calibrate",
    "page_size": "prefill and decode need the same --page-size",
}
_MISMATCH_HINTS["v_scales"] = _MISMATCH_HINTS["k_scales"]


class LayoutMismatchError(ValueError):
    """Two KV layouts cannot exchange pages; ``field`` names the first mismatching field."""

    def __init__(self, field_name: str, local, remote, message: str | None = None):
        self.field = field_name
        self.local = local
        self.remote = remote
        if message is not None:
            super().__init__(message)
            return
        hint = _MISMATCH_HINTS.get(field_name)
        if field_name in ("k_scales", "v_scales") and len(local) == len(remote):
            layer = next(i for i, (a, b) in enumerate(zip(local, remote)) if a != b)
            what = f"layer {layer}: local={local[layer]!r} remote={remote[layer]!r}"
        else:
            what = f"local={local!r} remote={remote!r}"
        super().__init__(f"KV layout mismatch on {field_name}: {what}" + (f" ({hint})" if hint else ""))


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical string for a torch dtype as carried in ``PoolLayout.dtype``."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype}; allowed: {sorted(_NAME_DTYPES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _NAME_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown KV dtype {name!r}; allowed: {sorted(_NAME_DTYPES)}") from None


def _mem_type(t: torch.Tensor) -> tuple[str, int]:
    if t.device.type == "cpu":
        return "DRAM", 0
    if t.device.type == "cuda":
        return "VRAM", t.device.index or 0
    raise ValueError(f"KV buffers must be on cpu or cuda, got device {t.device}")


@dataclass
class KvBuffers:
    """The engine's KV pool as the transfer library sees it (no engine import needed).

    ``k[l]`` / ``v[l]``: layer ``l``'s K / V tensor ``[num_pages, page_size, kv_heads,
    head_dim]``, contiguous, all of one shape, dtype and device (``num_layers``, ``num_pages``,
    ``page_size``, ``kv_heads``, ``head_dim`` and ``dtype`` are set from them). ``aux``: uint8 tensor
    ``[num_aux_slots, aux_slot_bytes]`` (``aux_slot_bytes >= 64``) on the same kind of
    memory as K/V (a PoolLayout carries one ``mem_type``). ``k_scales`` / ``v_scales``: one
    dequantization scale per layer for FP8 K/V (required then), empty otherwise.
    """

    k: Sequence[torch.Tensor]
    v: Sequence[torch.Tensor]
    aux: torch.Tensor
    k_scales: Sequence[float] = ()
    v_scales: Sequence[float] = ()
    # Tensor parallelism: this pool is rank tp_rank's of tp_size, holding the model's KV heads
    # [kv_head_start, kv_head_start + kv_heads) of total_kv_heads (0: kv_heads, an unsharded pool).
    tp_size: int = 1
    tp_rank: int = 0
    kv_head_start: int = 0
    total_kv_heads: int = 0

    def __post_init__(self):
        self.k = list(self.k)
        self.v = list(self.v)
        if not self.k or len(self.k) != len(self.v):
            raise ValueError(
                f"KvBuffers needs one K and one V tensor per layer, got {len(self.k)} K "
                f"and {len(self.v)} V tensors"
            )
        ref = self.k[0]
        if ref.dim() != 4:
            raise ValueError(
                f"K/V tensors must be [num_pages, page_size, kv_heads, head_dim], got shape "
                f"{tuple(ref.shape)}"
            )
        dtype_name(ref.dtype)
        for name, tensors in (("k", self.k), ("v", self.v)):
            for i, t in enumerate(tensors):
                if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                    raise ValueError(
                        f"{name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}, expected "
                        f"{tuple(ref.shape)} {ref.dtype} on {ref.device} like k[0]"
                    )
                if not t.is_contiguous():
                    raise ValueError(f"{name}[{i}] must be contiguous")
        a = self.aux
        if a.dim() != 2 or a.dtype != torch.uint8 or not a.is_contiguous():
            raise ValueError(
                f"aux must be a contiguous uint8 tensor [num_aux_slots, aux_slot_bytes], got "
                f"{tuple(a.shape)} {a.dtype}"
            )
        if a.shape[1] < AUX_MIN_SLOT_BYTES:
            raise ValueError(
                f"aux_slot_bytes is {a.shape[1]}, must be >= {AUX_MIN_SLOT_BYTES}"
            )
        self.k_scales = tuple(float(s) for s in self.k_scales)
        self.v_scales = tuple(float(s) for s in self.v_scales)
        if dtype_name(ref.dtype) in _FP8_NAMES:
            if len(self.k_scales) != len(self.k) or len(self.v_scales) != len(self.k):
                raise ValueError(
                    f"{ref.dtype} K/V need one K and one V scale per layer: got {len(self.k_scales)} "
                    f"and {len(self.v_scales)} for {len(self.k)} layers"
                )
        elif self.k_scales or self.v_scales:
            raise ValueError(f"KV scales are for FP8 K/V, not {ref.dtype}")
        # The pool's shape, fixed from here on.
        self.num_layers, self.dtype = len(self.k), ref.dtype
        self.num_pages, self.page_size, self.kv_heads, self.head_dim = ref.shape
        self.total_kv_heads = self.total_kv_heads or self.kv_heads
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.kv_head_start
                and self.kv_head_start + self.kv_heads <= self.total_kv_heads):
            raise ValueError(f"TP rank {self.tp_rank} of {self.tp_size} holding KV heads [{self.kv_head_start}, "
                             f"{self.kv_head_start + self.kv_heads}) of {self.total_kv_heads}: out of range")

    @property
    def bytes_per_page(self) -> int:
        return self.page_size * self.kv_heads * self.head_dim * self.k[0].element_size()

    @property
    def num_aux_slots(self) -> int:
        return self.aux.shape[0]

    @property
    def aux_slot_bytes(self) -> int:
        return self.aux.shape[1]

    @property
    def mem_type(self) -> str:
        return _mem_type(self.k[0])[0]

    @property
    def device_id(self) -> int:
        return _mem_type(self.k[0])[1]

    @property
    def aux_mem_type(self) -> str:
        """The aux rows may live elsewhere than K/V (host memory on GPU workers)."""
        return _mem_type(self.aux)[0]

    @property
    def aux_device_id(self) -> int:
        return _mem_type(self.aux)[1]

    def regions(self, include_aux: bool = True) -> list[tuple[int, int, int]]:
        """(addr, nbytes, device_id) of the K/V buffers (and aux), adjacent ones coalesced.

        An engine that allocates all layers in one tensor gives one or two regions;
        registering few large regions keeps NIXL/UCX registration cheap.
        """
        raw = sorted(
            (t.data_ptr(), t.numel() * t.element_size(), _mem_type(t)[1])
            for t in [*self.k, *self.v, *([self.aux] if include_aux else [])]
        )
        # GPU tensors are never merged: two allocations that happen to be adjacent in the
        # address space are still two CUDA allocations, and CUDA IPC (UCX's cuda_ipc)
        # cannot export a region that spans both.
        merge = self.mem_type == "DRAM"
        out: list[list[int]] = []
        for addr, n, dev in raw:
            if merge and out and out[-1][2] == dev and out[-1][0] + out[-1][1] == addr:
                out[-1][1] += n
            else:
                out.append([addr, n, dev])
        return [tuple(r) for r in out]


@dataclass
class PoolLayout:
    """A worker's KV pool as its peers see it: shape, dtype, base addresses, memory kind.

    Field for field what ``tandem.v1.KvLayout`` carries on the wire (the worker converts).
    """

    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    bytes_per_page: int
    num_pages: int
    k_base_addrs: tuple[int, ...] = ()
    v_base_addrs: tuple[int, ...] = ()
    aux_base_addr: int = 0
    aux_slot_bytes: int = 0
    num_aux_slots: int = 0
    mem_type: str = "DRAM"
    device_id: int = 0
    model_fingerprint: str = ""
    aux_mem_type: str = ""  # empty: the same as mem_type
    aux_device_id: int = 0
    k_scales: tuple[float, ...] = ()  # FP8: each layer's K dequantization scale (empty otherwise)
    v_scales: tuple[float, ...] = ()
    tp_size: int = 1  # ranks of the worker; this pool is rank tp_rank's
    tp_rank: int = 0
    kv_head_start: int = 0  # first of the model's KV heads this pool holds (num_kv_heads of them)
    total_kv_heads: int = 0  # the model's KV heads (0: num_kv_heads, an unsharded pool)

    def __post_init__(self):
        self.k_base_addrs = tuple(int(a) for a in self.k_base_addrs)
        self.v_base_addrs = tuple(int(a) for a in self.v_base_addrs)
        self.k_scales = tuple(float(s) for s in self.k_scales)
        self.v_scales = tuple(float(s) for s in self.v_scales)
        self.tp_size = max(1, int(self.tp_size))
        self.total_kv_heads = int(self.total_kv_heads) or self.num_kv_heads

    @property
    def element_bytes(self) -> int:
        """Bytes of one K (or V) element."""
        return self.bytes_per_page // max(1, self.page_size * self.num_kv_heads * self.head_dim)


def build_layout(buffers: KvBuffers, model_fingerprint: str = "") -> PoolLayout:
    """The :class:`PoolLayout` describing ``buffers`` (with base addresses)."""
    return PoolLayout(
        num_layers=buffers.num_layers,
        page_size=buffers.page_size,
        num_kv_heads=buffers.kv_heads,
        head_dim=buffers.head_dim,
        dtype=dtype_name(buffers.dtype),
        bytes_per_page=buffers.bytes_per_page,
        num_pages=buffers.num_pages,
        k_base_addrs=[t.data_ptr() for t in buffers.k],
        v_base_addrs=[t.data_ptr() for t in buffers.v],
        aux_base_addr=buffers.aux.data_ptr(),
        aux_slot_bytes=buffers.aux_slot_bytes,
        num_aux_slots=buffers.num_aux_slots,
        mem_type=buffers.mem_type,
        device_id=buffers.device_id,
        model_fingerprint=model_fingerprint,
        aux_mem_type=buffers.aux_mem_type,
        aux_device_id=buffers.aux_device_id,
        k_scales=buffers.k_scales,
        v_scales=buffers.v_scales,
        tp_size=buffers.tp_size,
        tp_rank=buffers.tp_rank,
        kv_head_start=buffers.kv_head_start,
        total_kv_heads=buffers.total_kv_heads,
    )


# Fields two workers must agree on to exchange pages, in the order they are checked.
_COMPAT_FIELDS = (
    "model_fingerprint",
    "num_layers",
    "page_size",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "k_scales",
    "v_scales",
    "bytes_per_page",
)


def check_compatible(local: PoolLayout, remote: PoolLayout) -> None:
    """Raise :class:`LayoutMismatchError` naming the first field that differs.

    Pool sizes (pages, aux slots), addresses and memory kinds may differ between workers; so may
    their TP sizes, when both shard the same model's KV heads (a rank's heads and page bytes then
    differ, and pages move as head slices).
    """
    sharded = local.tp_size > 1 or remote.tp_size > 1
    if sharded and local.total_kv_heads != remote.total_kv_heads:
        raise LayoutMismatchError(
            "total_kv_heads", local.total_kv_heads, remote.total_kv_heads,
            f"KV layout mismatch: this side (TP {local.tp_size}) has a model of {local.total_kv_heads} KV heads "
            f"({local.num_kv_heads} per rank), the peer (TP {remote.tp_size}) one of {remote.total_kv_heads} "
            f"({remote.num_kv_heads} per rank): prefill and decode must serve the same model")
    for f in _COMPAT_FIELDS:
        if sharded and f in ("num_kv_heads", "bytes_per_page"):
            continue  # per rank; the model's heads were compared above
        a, b = getattr(local, f), getattr(remote, f)
        if a != b:
            raise LayoutMismatchError(f, a, b)


@dataclass(frozen=True)
class HeadSlice:
    """The KV heads one pool writes into another: ``num_heads`` heads starting at head ``src_head`` of
    the source pool and ``dst_head`` of the destination pool (model head ``model_head``)."""

    src_head: int
    dst_head: int
    num_heads: int
    model_head: int

    def whole_pages(self, local: PoolLayout, remote: PoolLayout) -> bool:
        """Both pools hold exactly these heads: pages move whole."""
        return self.num_heads == local.num_kv_heads == remote.num_kv_heads


def writes_heads(layout: PoolLayout) -> bool:
    """Whether this (sending) rank writes its heads: a KV head replicated over ranks is written by
    the lowest of them only."""
    if layout.total_kv_heads >= layout.tp_size:
        return True
    return layout.tp_rank % (layout.tp_size // layout.total_kv_heads) == 0


def head_slice(local: PoolLayout, remote: PoolLayout) -> HeadSlice | None:
    """The heads ``local`` (a sender's rank) writes into ``remote`` (a receiver's rank); None when
    they share none, or when another sender rank writes ``local``'s replicated heads."""
    if not writes_heads(local):
        return None
    lo = max(local.kv_head_start, remote.kv_head_start)
    hi = min(local.kv_head_start + local.num_kv_heads, remote.kv_head_start + remote.num_kv_heads)
    if hi <= lo:
        return None
    return HeadSlice(lo - local.kv_head_start, lo - remote.kv_head_start, hi - lo, lo)


def writers_of(remote: PoolLayout, senders: Sequence[PoolLayout]) -> list[int]:
    """Indices of ``senders`` (one layout per sender rank) that write into ``remote``; ValueError
    naming both TP sizes and head counts unless they cover every head ``remote`` holds exactly once."""
    covered = np.zeros(remote.num_kv_heads, dtype=np.int64)
    out = []
    for i, s in enumerate(senders):
        hs = head_slice(s, remote)
        if hs is not None:
            covered[hs.dst_head:hs.dst_head + hs.num_heads] += 1
            out.append(i)
    if not (covered == 1).all():
        tp = senders[0].tp_size if senders else 0
        raise ValueError(
            f"prefill TP {tp} ({senders[0].num_kv_heads if senders else 0} KV heads per rank of "
            f"{remote.total_kv_heads}) cannot fill decode rank {remote.tp_rank} of TP {remote.tp_size} "
            f"(KV heads [{remote.kv_head_start}, {remote.kv_head_start + remote.num_kv_heads})): heads covered "
            f"{covered.tolist()} times")
    return out


def slice_descriptors(
    local: PoolLayout,
    remote: PoolLayout,
    src_pages,
    dst_pages,
    hs: HeadSlice,
    layers: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Byte descriptors ``[n, 3]`` (addr, nbytes, device_id) writing head slice ``hs`` of local pages
    ``src_pages`` into remote pages ``dst_pages``, every layer (or ``layers``), K then V: whole page
    runs when both hold the same heads (:func:`run_descriptors`), else one range per token."""
    if hs.whole_pages(local, remote):
        return run_descriptors(local, remote, merge_page_runs(src_pages, dst_pages), layers)
    elt = local.element_bytes
    if elt != remote.element_bytes or local.page_size != remote.page_size or local.head_dim != remote.head_dim:
        raise ValueError("head slices need the same dtype, page size and head dim on both sides")
    src = np.asarray(src_pages, dtype=np.uint64).reshape(-1)
    dst = np.asarray(dst_pages, dtype=np.uint64).reshape(-1)
    if src.shape != dst.shape:
        raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
    head_bytes = local.head_dim * elt
    tok = np.arange(local.page_size, dtype=np.uint64)
    # Offsets inside every page of the sliced heads of each token: [pages, page_size].
    s_off = (src[:, None] * np.uint64(local.bytes_per_page)
             + (tok[None, :] * np.uint64(local.num_kv_heads) + np.uint64(hs.src_head)) * np.uint64(head_bytes))
    d_off = (dst[:, None] * np.uint64(remote.bytes_per_page)
             + (tok[None, :] * np.uint64(remote.num_kv_heads) + np.uint64(hs.dst_head)) * np.uint64(head_bytes))
    s_off, d_off = s_off.reshape(-1), d_off.reshape(-1)
    idx = np.asarray(range(local.num_layers) if layers is None else list(layers), dtype=np.int64)
    src_bases = np.concatenate((np.asarray(local.k_base_addrs, dtype=np.uint64)[idx],
                                np.asarray(local.v_base_addrs, dtype=np.uint64)[idx]))
    dst_bases = np.concatenate((np.asarray(remote.k_base_addrs, dtype=np.uint64)[idx],
                                np.asarray(remote.v_base_addrs, dtype=np.uint64)[idx]))
    n = src_bases.size * s_off.size
    out_s, out_d = np.empty((n, 3), dtype=np.uint64), np.empty((n, 3), dtype=np.uint64)
    out_s[:, 0] = (src_bases[:, None] + s_off[None, :]).reshape(-1)
    out_d[:, 0] = (dst_bases[:, None] + d_off[None, :]).reshape(-1)
    out_s[:, 1] = out_d[:, 1] = hs.num_heads * head_bytes
    out_s[:, 2] = local.device_id
    out_d[:, 2] = remote.device_id
    return out_s, out_d


def check_addresses(layout: PoolLayout) -> None:
    """Raise ValueError unless ``layout`` carries one K and one V base address per layer."""
    n = layout.num_layers
    if len(layout.k_base_addrs) != n or len(layout.v_base_addrs) != n:
        raise ValueError(
            f"layout has {len(layout.k_base_addrs)} K and {len(layout.v_base_addrs)} V base "
            f"addresses for {n} layers"
        )
    if layout.mem_type not in ("DRAM", "VRAM"):
        raise ValueError(f"layout mem_type is {layout.mem_type!r}, allowed: DRAM, VRAM")


def validate_pages(pages, num_pages: int, what: str = "page") -> np.ndarray:
    """Page indices as an int64 array; ValueError naming the first index outside the pool."""
    arr = np.asarray(pages, dtype=np.int64).reshape(-1)
    if arr.size:
        bad = np.nonzero((arr < 0) | (arr >= num_pages))[0]
        if bad.size:
            raise ValueError(
                f"{what} index {int(arr[bad[0]])} out of range for a pool of {num_pages} pages"
            )
    return arr


def merge_page_runs(src_pages, dst_pages) -> np.ndarray:
    """Merge a page map into runs contiguous on both sides (as SGLang's
    ``group_concurrent_contiguous``): returns an int64 array ``[n_runs, 3]`` of
    ``(src_start, dst_start, length)``; ``src_pages[i] -> dst_pages[i]`` for all ``i``.
    """
    src = np.asarray(src_pages, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_pages, dtype=np.int64).reshape(-1)
    if src.shape != dst.shape:
        raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
    if src.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    breaks = np.nonzero((np.diff(src) != 1) | (np.diff(dst) != 1))[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [src.size]))
    return np.stack((src[starts], dst[starts], ends - starts), axis=1)


def run_descriptors(
    local: PoolLayout,
    remote: PoolLayout,
    runs: np.ndarray,
    layers: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Byte descriptors ``[n, 3]`` (addr, nbytes, device_id) for local -> remote copies of
    ``runs`` (from :func:`merge_page_runs`) in every layer (or ``layers``), K then V.

    Row ``i`` of the source array pairs with row ``i`` of the destination array.
    """
    bpp = local.bytes_per_page
    layer_ids = range(local.num_layers) if layers is None else layers
    lk = np.asarray(local.k_base_addrs, dtype=np.uint64)
    lv = np.asarray(local.v_base_addrs, dtype=np.uint64)
    rk = np.asarray(remote.k_base_addrs, dtype=np.uint64)
    rv = np.asarray(remote.v_base_addrs, dtype=np.uint64)
    idx = np.asarray(list(layer_ids), dtype=np.int64)
    src_bases = np.concatenate((lk[idx], lv[idx]))  # [2L]
    dst_bases = np.concatenate((rk[idx], rv[idx]))
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    src_off = (runs[:, 0] * bpp).astype(np.uint64)
    dst_off = (runs[:, 1] * bpp).astype(np.uint64)
    nbytes = (runs[:, 2] * bpp).astype(np.uint64)
    n = src_bases.size * runs.shape[0]
    src = np.empty((n, 3), dtype=np.uint64)
    dst = np.empty((n, 3), dtype=np.uint64)
    src[:, 0] = (src_bases[:, None] + src_off[None, :]).reshape(-1)
    dst[:, 0] = (dst_bases[:, None] + dst_off[None, :]).reshape(-1)
    src[:, 1] = dst[:, 1] = np.tile(nbytes, src_bases.size)
    src[:, 2] = local.device_id
    dst[:, 2] = remote.device_id
    return src, dst


def check_allocation(remote: PoolLayout, dst_pages: Sequence[int], aux_slot: int, num_pages: int) -> None:
    """Raise ValueError naming the problem unless ``dst_pages`` (``num_pages`` distinct pages of
    ``remote``'s pool) and ``aux_slot`` can receive a room: the one check of an allocation."""
    if len(dst_pages) != num_pages:
        raise ValueError(f"allocation has {len(dst_pages)} pages, the prompt needs {num_pages}")
    pages = validate_pages(dst_pages, remote.num_pages, "decode page")
    if len(np.unique(pages)) != len(pages):
        raise ValueError("allocation repeats a page index")
    if not 0 <= aux_slot < remote.num_aux_slots:
        raise ValueError(f"aux slot {aux_slot} out of range for {remote.num_aux_slots} aux slots")


def pages_needed(num_tokens: int, page_size: int) -> int:
    """Pages holding ``num_tokens`` tokens."""
    return math.ceil(num_tokens / page_size)


