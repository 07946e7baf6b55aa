"""The aux (metadata) record prefill hands decode next to a room's KV pages.

It is the only place the first sampled token travels: prefill writes it into decode's aux
slot (NIXL WRITE, or as :class:`~tandem.transfer.messages.AuxData` bytes on the control
stream) and decode reads it back once the room succeeded. One record carries the first
token of each of a request's ``n`` parallel samples.

Fixed little-endian format (a slot of ``slot_bytes`` bytes, zeros after the last entry)::

    offset  type     field
    0       uint64   room            (lets decode reject a stale row left in the slot)
    8       int32    cached_tokens   (prompt tokens served from prefill's prefix cache)
    12      uint16   num_samples     (>= 1 in a written row; 0 in a cleared slot)
    14      uint16   num_top         (top-logprob entries per sample)
    16      num_samples x (int32 token_id, float32 logprob)    logprob NaN when not requested
    ..      num_samples x num_top x (int32 token_id, float32 logprob)

A 64-byte slot holds 6 samples, or 1 sample with 5 top logprobs: ``aux_max_samples`` and
``aux_max_top`` say how many fit. Samples never get truncated (packing more than fit is an
error); top logprobs beyond what fits are dropped.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import torch

# Smallest aux slot an engine may give (SGLang's metadata rows are >= 64 bytes).
AUX_MIN_SLOT_BYTES = 64

AUX_HEADER = struct.Struct("<QiHH")
AUX_ENTRY = struct.Struct("<if")


@dataclass
class SampleToken:
    """The first token of one sample, with its logprob (NaN: not requested) and top logprobs."""

    token_id: int
    logprob: float = math.nan
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class AuxRow:
    """Per-request metadata prefill hands to decode with the KV pages."""

    room: int
    samples: list[SampleToken]
    cached_tokens: int = 0

    @classmethod
    def one(cls, room: int, token_id: int, logprob: float = math.nan, cached_tokens: int = 0,
            top_logprobs=()) -> AuxRow:
        """A row for a request with one sample."""
        return cls(room, [SampleToken(token_id, logprob, list(top_logprobs))], cached_tokens)

    @property
    def first_token_id(self) -> int:
        """Sample 0's first token."""
        return self.samples[0].token_id


def aux_max_samples(slot_bytes: int) -> int:
    """How many samples' first tokens fit in a slot of ``slot_bytes``."""
    return max(0, (slot_bytes - AUX_HEADER.size) // AUX_ENTRY.size)


def aux_max_top(slot_bytes: int, num_samples: int = 1) -> int:
    """How many top-logprob entries per sample fit next to ``num_samples`` samples."""
    free = slot_bytes - AUX_HEADER.size - num_samples * AUX_ENTRY.size
    return max(0, free // (AUX_ENTRY.size * max(1, num_samples)))


def pack_aux_row(row: AuxRow, slot_bytes: int) -> bytes:
    """``row`` as exactly ``slot_bytes`` bytes."""
    n = len(row.samples)
    if not 1 <= n <= aux_max_samples(slot_bytes):
        raise ValueError(f"an aux row carries 1 to {aux_max_samples(slot_bytes)} samples in a "
                         f"{slot_bytes}-byte slot, got {n}")
    tops = {len(s.top_logprobs) for s in row.samples}
    if len(tops) > 1:
        raise ValueError(f"samples carry different numbers of top logprobs: {sorted(tops)}")
    num_top = min(tops.pop(), aux_max_top(slot_bytes, n))
    buf = bytearray(slot_bytes)
    AUX_HEADER.pack_into(buf, 0, row.room, row.cached_tokens, n, num_top)
    at = AUX_HEADER.size
    for s in row.samples:
        AUX_ENTRY.pack_into(buf, at, s.token_id, s.logprob)
        at += AUX_ENTRY.size
    for s in row.samples:
        for tok, lp in s.top_logprobs[:num_top]:
            AUX_ENTRY.pack_into(buf, at, tok, lp)
            at += AUX_ENTRY.size
    return bytes(buf)


def unpack_aux_row(data) -> AuxRow:
    """Inverse of :func:`pack_aux_row` (``data``: bytes, memoryview or uint8 tensor). A cleared
    slot reads as room 0 with no samples."""
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy().tobytes()
    data = bytes(data)
    room, cached, n, num_top = AUX_HEADER.unpack_from(data, 0)
    if n > aux_max_samples(len(data)) or (n and num_top > aux_max_top(len(data), n)):
        raise ValueError(f"aux row claims {n} samples with {num_top} top logprobs each, more than a "
                         f"{len(data)}-byte slot holds")
    entries = [AUX_ENTRY.unpack_from(data, AUX_HEADER.size + i * AUX_ENTRY.size)
               for i in range(n * (1 + num_top))]
    samples = []
    for i, (tok, lp) in enumerate(entries[:n]):
        top = entries[n + i * num_top: n + (i + 1) * num_top]
        samples.append(SampleToken(int(tok), float(lp), [(int(t), float(p)) for t, p in top]))
    return AuxRow(int(room), samples, int(cached))
