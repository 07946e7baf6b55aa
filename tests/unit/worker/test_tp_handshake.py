"""The worker-level pieces of PD across TP sizes, in one process (the processes: tests/integration/test_tp_pd.py):
RegisterDecode carries every decode rank and its answer every prefill rank; a pairing that cannot be
served is refused naming both TP sizes and head counts; a one-rank prefill's RankedSender writes both
ranks of a TP 2 decode, each message naming the rank it fills."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from tandem.engine.tensor_parallel import head_split
from tandem.transfer import AuxRow, KvBuffers, KVPoll, SampleToken, build_layout, make_receiver, make_sender
from tandem.v1 import prefill_pb2
from tandem.worker.errors import RequestFailed
from tandem.worker.pd_proto import (
    layout_to_proto,
    prefill_agents,
    registration_from_request,
    registration_to_request,
)
from tandem.worker.prefill import PrefillWorker
from tandem.worker.tp_transfer import RankedReceiver, RankedSender

LAYERS, PAGE, HD, PAGES = 2, 4, 8, 10


def buffers(tp: int, rank: int, kv_heads: int = 4, full: list | None = None) -> KvBuffers:
    hs = head_split(2 * kv_heads, kv_heads, tp, rank)
    ts = [t[:, :, hs.kv_start:hs.kv_start + hs.kv_heads].clone() if full is not None
          else torch.zeros(PAGES, PAGE, hs.kv_heads, HD) for t in (full or [None] * (2 * LAYERS))]
    return KvBuffers(ts[:LAYERS], ts[LAYERS:], torch.zeros(4, 192, dtype=torch.uint8), tp_size=tp, tp_rank=rank,
                     kv_head_start=hs.kv_start, total_kv_heads=kv_heads)


class _Loop:
    """What PrefillWorker reads of its engine loop at construction."""

    kv_snapshot = None

    def subscribe_kv_events(self, fn) -> None:
        pass


class _Config:
    disaggregation_transfer_timeout = 5.0


def decode_registration(kv_heads: int = 4) -> tuple[list, prefill_pb2.RegisterDecodeRequest]:
    """A TP 2 decode worker's RegisterDecode: rank 0's receiver plus every rank's."""
    rxs = [make_receiver("grpc", buffers(2, d, kv_heads), f"dec-{kv_heads}-{d}") for d in range(2)]
    reg = rxs[0].registration()
    reg = type(reg)(reg.backend, reg.agent_name, reg.agent_metadata, reg.layout,
                    tuple(rx.registration() for rx in rxs))
    return rxs, registration_to_request(reg, "decode-tp2")


def test_register_decode_carries_every_rank_and_refuses_another_model():
    rxs, req = decode_registration()
    back = registration_from_request(req)
    assert [r.layout.tp_rank for r in back.ranks] == [0, 1] and back.ranks[1].agent_name == "dec-4-1"
    # A one-rank prefill of the same model: registered; its answer lists no ranks (one rank).
    worker = PrefillWorker(_Config(), _Loop(), RankedSender(make_sender("grpc", buffers(1, 0), "pre")), "prefill-1")
    resp = worker.register_decode(req)
    assert resp.agent_name == "pre" and not resp.ranks and prefill_agents(resp) == "pre"
    # A prefill of a model with 6 KV heads: refused, naming both TP sizes and head counts.
    other = PrefillWorker(_Config(), _Loop(), RankedSender(make_sender("grpc", buffers(1, 0, kv_heads=6), "p6")),
                          "prefill-6")
    with pytest.raises(RequestFailed) as err:
        other.register_decode(req)
    assert err.value.status == grpc.StatusCode.FAILED_PRECONDITION
    assert "TP 1" in err.value.message and "6 KV heads" in err.value.message
    assert "TP 2" in err.value.message and "4 (2 per rank)" in err.value.message, err.value.message
    # A sender of one pool never takes a decode worker of several ranks as one.
    with pytest.raises(ValueError, match="has 2 TP ranks"):
        make_sender("grpc", buffers(1, 0), "plain").add_peer(back)


def test_prefill_agents_map_to_the_decode_ranks_holding_their_heads():
    prefill = tuple((f"p-{r}", build_layout(buffers(2, r))) for r in range(2))
    resp = prefill_pb2.RegisterDecodeResponse(agent_name="p-0", ranks=[
        prefill_pb2.RankAgent(agent_name=n, layout=layout_to_proto(lay)) for n, lay in prefill])
    assert prefill_agents(resp) == prefill
    one = RankedReceiver(make_receiver("grpc", buffers(1, 0), "d1"))
    # A one-rank decode holds both prefill ranks' heads: it expects both; a plain agent name passes through.
    assert one._peers_of(prefill) == [("p-0", "p-1")]  # noqa: SLF001
    assert one._peers_of("p") == ["p"]  # noqa: SLF001


def test_one_rank_prefill_writes_both_decode_ranks():
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(PAGES, PAGE, 4, HD, generator=g) for _ in range(2 * LAYERS)]
    rxs, req = decode_registration()
    tx = RankedSender(make_sender("grpc", buffers(1, 0, full=full), "pre-full"))
    peer = tx.add_peer(registration_from_request(req))
    room, src, dst = 77, [3, 1, 7], [0, 9, 4]
    for rx in rxs:
        rx.expect(room, dst, aux_slot=2, peer="pre-full")
    hs = [tx.send_kv(room, peer, src, dst, 0, True), tx.send_aux(room, peer, 2, AuxRow(room, [SampleToken(9, -1.0)]))]
    assert tx.check(hs).done
    ranks_seen = set()
    for h in hs:
        for m in h.messages:
            ranks_seen.add(m.dst_rank)
            rxs[m.dst_rank].handle(m)
    done = tx.done(room, hs)
    for rx in rxs:
        rx.handle(done)
        assert rx.poll(room) is KVPoll.Success, rx.failure(room)
        assert rx.aux_row(room).samples[0].token_id == 9
    assert ranks_seen == {0, 1}
    for d, rx in enumerate(rxs):
        heads = slice(2 * d, 2 * d + 2)
        for layer in range(LAYERS):
            torch.testing.assert_close(rx.buffers.k[layer][np.array(dst)], full[layer][np.array(src)][:, :, heads],
                                       rtol=0, atol=0)
            torch.testing.assert_close(rx.buffers.v[layer][np.array(dst)],
                                       full[LAYERS + layer][np.array(src)][:, :, heads], rtol=0, atol=0)
