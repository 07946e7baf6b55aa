"""Follow one worker's KvEvents stream into a :class:`KvIndex` (the router follows its decode
workers, decode follows its prefill workers for kv_aware prefill selection)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from tandem.routing.kv_index import KvIndex
from tandem.v1 import common_pb2

log = logging.getLogger(__name__)


async def follow_kv_events(subscribe: Callable[[common_pb2.KvEventsRequest], AsyncIterator[common_pb2.KvEventBatch]],
                           index: KvIndex, worker_id: str, ready: Callable[[], bool] = lambda: True,
                           idle_wait_s: float = 0.25) -> None:
    """Keep ``index`` fed from one worker until cancelled.

    ``subscribe(request)`` opens the worker's KvEvents call (a ``grpc.aio`` stub method);
    ``ready()`` says whether the worker may be asked now (e.g. it is healthy). Each
    subscription starts with a snapshot; a sequence gap or an error drops the worker's
    blocks and subscribes again with a fresh snapshot (backing off 0.2 s to 5 s).
    """
    delay = 0.2
    while True:
        if not ready():
            await asyncio.sleep(idle_wait_s)
            continue
        index.clear(worker_id)
        index.reset_sequence(worker_id)
        call = subscribe(common_pb2.KvEventsRequest(snapshot=True))
        try:
            async for batch in call:
                delay = 0.2
                if not index.apply_batch(worker_id, batch):
                    log.warning("kv events of %s: sequence gap at %d; resubscribing", worker_id, batch.sequence)
                    break
        except grpc.aio.AioRpcError as e:
            lvl = logging.DEBUG if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) \
                else logging.WARNING
            log.log(lvl, "kv events of %s: %s %s", worker_id, e.code().name, e.details())
        finally:
            call.cancel()
        index.clear(worker_id)
        await asyncio.sleep(delay)
        delay = min(5.0, delay * 2)
