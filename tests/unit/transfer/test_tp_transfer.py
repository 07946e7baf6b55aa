"""PD between prefill and decode workers of different TP sizes, in one process: every prefill rank's
pool holds its KV heads (as the engine shards them), every decode rank's receiver takes the head
slices of the prefill ranks that hold its heads (a replicated head written once) and the aux row
from prefill rank 0. Over grpc and nixl, the decode ranks' pages must hold exactly the one-rank
pool's K/V of their heads; a pairing of different models is refused naming both TP sizes and heads.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tandem.engine.tensor_parallel import head_split
from tandem.transfer import (
    AuxRow,
    KvBuffers,
    KVPoll,
    LayoutMismatchError,
    SampleToken,
    TransferDone,
    available_backends,
    build_layout,
    check_compatible,
    head_slice,
    make_receiver,
    make_sender,
    writers_of,
)

HEADS, Q_HEADS, LAYERS, PAGE, HD, PAGES = 4, 8, 2, 4, 8, 12
_n = itertools.count()


def full_pool(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(PAGES, PAGE, HEADS, HD, generator=g) for _ in range(2 * LAYERS)]  # K of each layer, then V


def rank_buffers(full: list | None, tp: int, rank: int) -> KvBuffers:
    """Rank ``rank``'s pool of a TP ``tp`` worker: its heads of ``full`` (zeros when None)."""
    hs = head_split(Q_HEADS, HEADS, tp, rank)
    shape = (PAGES, PAGE, hs.kv_heads, HD)
    ts = [(t[:, :, hs.kv_start:hs.kv_start + hs.kv_heads].clone() if full is not None else torch.zeros(shape))
          for t in (full or [None] * (2 * LAYERS))]
    return KvBuffers(ts[:LAYERS], ts[LAYERS:], torch.zeros(4, 192, dtype=torch.uint8),
                     tp_size=tp, tp_rank=rank, kv_head_start=hs.kv_start, total_kv_heads=HEADS)


BACKENDS = ["grpc", pytest.param("nixl", marks=pytest.mark.skipif("nixl" not in available_backends(),
                                                                   reason="nixl not installed"))]
PAIRS = [(2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (8, 2), (1, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefill_tp,decode_tp", PAIRS)
def test_prefill_tp_to_decode_tp(backend, prefill_tp, decode_tp):
    full = full_pool(prefill_tp * 10 + decode_tp)
    src = np.array([7, 2, 3, 9, 10])
    dst = np.array([0, 5, 6, 11, 1])
    i = next(_n)
    senders = [make_sender(backend, rank_buffers(full, prefill_tp, r), f"p{i}-{r}") for r in range(prefill_tp)]
    decode = [rank_buffers(None, decode_tp, d) for d in range(decode_tp)]
    receivers = [make_receiver(backend, b, f"d{i}-{d}", transfer_timeout_s=None) for d, b in enumerate(decode)]
    try:
        room = 1234 + i
        written = np.zeros((decode_tp, HEADS), dtype=int)
        for d, rx in enumerate(receivers):
            writers = writers_of(rx.layout, [s.layout for s in senders])
            peers = {r: senders[r].add_peer(rx.registration()) for r in set(writers) | {0}}
            rx.expect(room, dst, aux_slot=1, peer=tuple(senders[r].name for r in writers) if backend == "nixl" else None)
            handles = []
            for r in writers:
                h = senders[r].send_kv(room, peers[r], src, dst, 0, True)
                hs = senders[r].head_slice(peers[r])
                written[d, hs.model_head:hs.model_head + hs.num_heads] += 1
                handles.append((senders[r], h))
            handles.append((senders[0], senders[0].send_aux(room, peers[0], 1, AuxRow(room, [SampleToken(5, -0.5)]))))
            for s, h in handles:
                assert s.wait(h, 10).done
                for m in h.messages:
                    rx.handle(m)
            rx.handle(TransferDone(room, 1, sum(h.nbytes for _, h in handles)))
            assert rx.wait(room, 10) == KVPoll.Success, rx.failure(room)
            assert rx.aux_row(room).samples[0].token_id == 5
            # The decode rank's pages hold the one-rank pool's K/V of its heads, the others stay untouched.
            lay = rx.layout
            heads = slice(lay.kv_head_start, lay.kv_head_start + lay.num_kv_heads)
            for layer in range(LAYERS):
                torch.testing.assert_close(decode[d].k[layer][dst], full[layer][src][:, :, heads], rtol=0, atol=0)
                torch.testing.assert_close(decode[d].v[layer][dst], full[LAYERS + layer][src][:, :, heads], rtol=0,
                                           atol=0)
                rest = np.setdiff1d(np.arange(PAGES), dst)
                assert not decode[d].k[layer][rest].any()
        # Every head a decode rank holds was written exactly once (replicated prefill heads once).
        for d, lay in enumerate(r.layout for r in receivers):
            assert written[d, lay.kv_head_start:lay.kv_head_start + lay.num_kv_heads].tolist() == [1] * lay.num_kv_heads
    finally:
        for s in senders:
            s.close()
        for rx in receivers:
            rx.close()


def test_head_slices_and_refusals():
    lay = {(tp, r): build_layout(rank_buffers(None, tp, r)) for tp in (1, 2, 4, 8) for r in range(tp)}
    # prefill TP 2 -> decode TP 4: rank 1 (heads 2, 3) writes head 2 into decode rank 2, head 3 into rank 3
    assert head_slice(lay[2, 1], lay[4, 2]).num_heads == 1 and head_slice(lay[2, 1], lay[4, 2]).src_head == 0
    assert head_slice(lay[2, 1], lay[4, 3]).src_head == 1
    assert head_slice(lay[2, 1], lay[4, 0]) is None
    # prefill TP 8 (each head on 2 ranks): only the even ranks write
    assert [head_slice(lay[8, r], lay[1, 0]) is not None for r in range(8)] == [True, False] * 4
    assert writers_of(lay[1, 0], [lay[8, r] for r in range(8)]) == [0, 2, 4, 6]
    assert writers_of(lay[2, 1], [lay[1, 0]]) == [0]
    with pytest.raises(ValueError, match=r"prefill TP 2 .* cannot fill decode rank 0 of TP 1"):
        writers_of(lay[1, 0], [lay[2, 0]])  # rank 1 missing: heads 2, 3 not covered
    check_compatible(lay[2, 0], lay[4, 3])  # different TP sizes of one model: fine
    other = build_layout(KvBuffers([torch.zeros(PAGES, PAGE, 3, HD)] * LAYERS, [torch.zeros(PAGES, PAGE, 3, HD)] * LAYERS,
                                   torch.zeros(4, 192, dtype=torch.uint8), tp_size=2, tp_rank=0, total_kv_heads=6))
    with pytest.raises(LayoutMismatchError, match=r"this side \(TP 2\) has a model of 4 KV heads \(2 per rank\), the "
                                                  r"peer \(TP 2\) one of 6 \(3 per rank\)"):
        check_compatible(lay[2, 0], other)
    with pytest.raises(ValueError, match="out of range"):
        KvBuffers([torch.zeros(PAGES, PAGE, 2, HD)], [torch.zeros(PAGES, PAGE, 2, HD)],
                  torch.zeros(4, 192, dtype=torch.uint8), tp_size=2, tp_rank=1, kv_head_start=3, total_kv_heads=4)


def test_tp_fields_cross_the_wire():
    """KvLayout carries each rank's TP place and heads, KvChunk a head slice's range (both ways)."""
    from tandem.transfer import KvPages
    from tandem.worker.pd_proto import layout_from_proto, layout_to_proto, message_from_proto, message_to_proto

    lay = build_layout(rank_buffers(None, 4, 3))
    assert (lay.tp_size, lay.tp_rank, lay.kv_head_start, lay.total_kv_heads, lay.num_kv_heads) == (4, 3, 3, 4, 1)
    assert layout_from_proto(layout_to_proto(lay)) == lay
    msg = KvPages(9, 0, (1, 2), True, 1, b"k" * 8, b"v" * 8, kv_head_start=3, kv_heads=1)
    assert message_from_proto(message_to_proto(msg)) == msg
