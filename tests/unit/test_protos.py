"""The tandem.v1 contract: generated code imports, messages round-trip, every field is documented."""
from __future__ import annotations

import re
from pathlib import Path

from tandem.v1 import common_pb2, decode_pb2, eplb_pb2, prefill_pb2, router_pb2

PROTO_DIR = Path(__file__).resolve().parents[2] / "protos" / "tandem" / "v1"


def test_prefill_handshake_messages_round_trip():
    msgs = [
        prefill_pb2.PrefillClientMessage(start=prefill_pb2.PrefillStart(
            request_id="r1", decode_id="d", input_ids=[1, 2, 3], room=9,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=4, seed=7))),
        prefill_pb2.PrefillClientMessage(allocation=prefill_pb2.PageAllocation(room=9, page_indices=[4, 5], aux_slot=1)),
        prefill_pb2.PrefillServerMessage(done=prefill_pb2.TransferDone(room=9, num_chunks=2, bytes_transferred=16)),
        prefill_pb2.PrefillServerMessage(aux=prefill_pb2.KvAux(room=9, row=b"\1" * 64)),
        prefill_pb2.PrefillServerMessage(failed=prefill_pb2.TransferFailed(
            room=9, error=common_pb2.ErrorDetail(code="backend_error", message="peer gone", retryable=True),
            reason=prefill_pb2.TRANSFER_FAILURE_REASON_BACKEND_ERROR)),
        prefill_pb2.PrefillServerMessage(chunk=prefill_pb2.KvChunk(room=9, layer=1, page_indices=[4], k=b"\0" * 8)),
        prefill_pb2.PrefillServerMessage(chunk=prefill_pb2.KvChunk(room=9, page_indices=[4], is_last=True)),
    ]
    for m in msgs:
        again = type(m).FromString(m.SerializeToString())
        assert again == m
        assert again.WhichOneof("msg") == m.WhichOneof("msg")
    assert msgs[0].start.sampling.HasField("seed")
    assert not common_pb2.SamplingParams().HasField("seed")
    # A chunk without a layer is the notice of pages written out of band; layer 0 is a layer.
    assert not msgs[-1].chunk.HasField("layer")
    assert prefill_pb2.KvChunk(layer=0).HasField("layer")


def test_other_services_messages_round_trip():
    layout = common_pb2.KvLayout(num_layers=2, page_size=16, k_base_addrs=[1, 2], v_base_addrs=[3, 4], dtype="float32")
    req = prefill_pb2.RegisterDecodeRequest(decode_id="d", agent_name="a", agent_metadata=b"\x01\x02", layout=layout)
    assert prefill_pb2.RegisterDecodeRequest.FromString(req.SerializeToString()) == req
    batch = common_pb2.KvEventBatch(sequence=3, events=[
        common_pb2.KvEvent(stored=common_pb2.BlockStored(block_hashes=[2**63 + 1], token_ids=[1] * 16, block_size=16)),
        common_pb2.KvEvent(removed=common_pb2.BlockRemoved(block_hashes=[5])),
        common_pb2.KvEvent(cleared=common_pb2.AllBlocksCleared()),
    ])
    assert common_pb2.KvEventBatch.FromString(batch.SerializeToString()) == batch
    plan = eplb_pb2.ExpertPlan(version=2, layers=[eplb_pb2.LayerPlacement(physical_to_logical=[0, 1, 1])])
    assert eplb_pb2.ExpertPlan.FromString(plan.SerializeToString()) == plan
    r = router_pb2.RouterGenerateRequest(chat=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content="hé")]))
    assert router_pb2.RouterGenerateRequest.FromString(r.SerializeToString()).WhichOneof("prompt") == "chat"
    assert decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name == "tandem.v1.Decode"


def test_every_proto_field_and_rpc_is_commented():
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        lines = proto.read_text().splitlines()
        assert "package tandem.v1;" in lines, proto.name
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = re.match(r"^(optional |repeated )?[\w.]+ \w+ = \d+;$", stripped)
            is_rpc = stripped.startswith("rpc ")
            if is_field or is_rpc:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} undocumented: {stripped}"
