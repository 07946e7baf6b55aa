"""The draining worker's table of requests held for a move (tandem.worker.kv_move.HeldMoves): a
fetch must name exactly the tokens whose KV is held and the LoRA adapter it was computed under."""
from __future__ import annotations

import grpc
import pytest
from tandem.engine import HeldForMove
from tandem.worker.errors import RequestFailed
from tandem.worker.kv_move import HeldMoves

KV = [5, 6, 7, 8, 9]


def table(lora_name=None) -> HeldMoves:
    held = HeldMoves()
    held.add({"r1": HeldForMove("r1", list(KV), [3, 4], 10, lora_name)})
    return held


@pytest.mark.parametrize("held_under,asked,why", [
    ("sql", None, "computed under adapter 'sql'"),
    (None, "sql", "computed under the base model"),
    ("sql", "chat", "lora_name='chat'"),
])
def test_a_fetch_under_another_adapter_is_refused_and_leaves_it_held(held_under, asked, why):
    held = table(held_under)
    with pytest.raises(RequestFailed, match=why) as exc:
        held.take("r1", KV, asked)
    assert exc.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "r1" in held and held.num_taken == 0


@pytest.mark.parametrize("lora_name", [None, "sql"])
def test_a_fetch_with_its_tokens_and_adapter_takes_it_once(lora_name):
    held = table(lora_name)
    assert held.check("r1", KV, lora_name).pages == [3, 4]
    assert held.take("r1", KV, lora_name).lora_name == lora_name
    assert held.num_taken == 1 and held.num_pages_taken == 2 and held.num_waiting == 0
    with pytest.raises(RequestFailed, match="no request waits here") as exc:
        held.take("r1", KV, lora_name)
    assert exc.value.status == grpc.StatusCode.NOT_FOUND


def test_a_fetch_with_other_tokens_is_refused():
    with pytest.raises(RequestFailed, match="are not the 5 tokens"):
        table().check("r1", KV[:-1])
