"""KV moves carry one rank's pool: a worker of several ranks (tensor or expert parallel) neither
holds KV for a move nor fetches it. A request moved to such a worker (GenerateRequest.kv_source)
is recomputed there with its tokens so far and its LoRA adapter, and the reason is named."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from tandem.config import DecodeConfig
from tandem.engine import StepOutput
from tandem.v1 import common_pb2, decode_pb2
from tandem.worker.decode import DecodeWorker
from tandem.worker.kv_move import KvMoves, moves_refused


def config(**kw) -> DecodeConfig:
    return DecodeConfig(model_path="unused", **kw)


@pytest.mark.parametrize("kw,why", [
    (dict(tp_size=2), "it runs 2 ranks (--tp-size 2, --ep-size 1)"),
    (dict(ep_size=4), "it runs 4 ranks (--tp-size 1, --ep-size 4)"),
    (dict(is_embedding=True), "it serves embeddings"),
])
def test_workers_of_several_ranks_refuse_moves(kw, why):
    assert why in moves_refused(config(**kw))


def test_a_one_rank_worker_moves_kv():
    assert moves_refused(config()) is None


class _Stream:
    def __init__(self, rid: str, token: int) -> None:
        self.rid, self._out = rid, [StepOutput(rid, [token], finished=True, finish_reason="length")]

    def __iter__(self):
        return iter(self._out)

    def cancel(self) -> None:
        pass


class RecordingLoop:
    """The engine-loop calls a Generate makes: it records what is submitted."""

    info = SimpleNamespace(page_size=4)
    num_streams = 0

    def __init__(self) -> None:
        self.submitted = []

    def kv_snapshot(self):
        return []

    def subscribe_kv_events(self, fn) -> None:
        pass

    def validate(self, ids, sp, output_ids=(), lora_name=None) -> None:
        pass

    def submit(self, ids, sp, rid, output_ids=(), lora_name=None, **kw):
        self.submitted.append((rid, list(ids), list(output_ids), lora_name))
        return _Stream(rid, 42)


def test_a_request_moved_to_a_tp_worker_is_recomputed_with_its_adapter(caplog):
    cfg = config(tp_size=2)
    loop = RecordingLoop()
    recomputed = []
    moves = KvMoves("me:1", fetcher=None, held=None, refused=moves_refused(cfg))
    moves.recomputed = lambda: recomputed.append(1)
    worker = DecodeWorker(cfg, loop, "w", moves=moves)
    req = decode_pb2.GenerateRequest(request_id="r", input_ids=[1, 2, 3], output_ids=[7, 8], lora_name="sql",
                                     sampling=common_pb2.SamplingParams(max_tokens=4),
                                     kv_source=common_pb2.KvMove(address="holder:1", move_id="m"))
    with caplog.at_level(logging.WARNING, logger="tandem.worker.decode"):
        chunks = list(worker.generate(req, lambda: True, lambda cb: None))
    assert [list(c.token_ids) for c in chunks] == [[42]] and chunks[0].request_id == "r"
    assert loop.submitted == [("r#recompute", [1, 2, 3], [7, 8], "sql")]
    assert recomputed == [1]
    assert "it runs 2 ranks" in caplog.text and "holder:1" in caplog.text
