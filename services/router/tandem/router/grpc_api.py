"""gRPC Router service (tandem.v1.Router) for the shared synchronous grpc.Server.

Each call is bridged into the router's asyncio loop: a pump task runs the request there and
hands chunks to the gRPC thread through a queue. When the RPC ends early (client cancel or
deadline), the gRPC callback cancels the pump task, which cancels the worker's Generate call.
The caller's deadline is passed on to the worker call.
"""
from __future__ import annotations

import asyncio
import queue
import uuid
from collections.abc import Callable

import grpc
from tandem.router.core import Prepared, RouterCore, RouterError
from tandem.routing.openai_protocol import OpenAIError
from tandem.routing.sampling import check_sampling
from tandem.v1 import common_pb2, router_pb2, router_pb2_grpc

_END = object()


class RouterServicer(router_pb2_grpc.RouterServicer):
    """``loop()``: the router's asyncio loop, where ``core`` runs (set once the router started)."""

    def __init__(self, core: RouterCore, loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.core = core
        self.loop = loop

    def _prepare(self, request: router_pb2.RouterGenerateRequest, context) -> Prepared:
        core = self.core
        if request.model and request.model != core.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}; serving {core.model_name!r}")
        tok = core.tokenizer
        kind = request.WhichOneof("prompt")
        try:
            if kind == "text":
                ids = tok.encode(request.text)
            elif kind == "chat":
                if not request.chat.messages:
                    raise ValueError("chat has no messages")
                ids = tok.encode_chat([{"role": m.role, "content": m.content} for m in request.chat.messages])
            elif kind == "token_ids":
                ids = list(request.token_ids.ids)
                if any(i < 0 for i in ids):
                    raise ValueError("token ids must be >= 0")
            else:
                raise ValueError("no prompt: set one of text, chat or token_ids")
            sampling = check_sampling(request.sampling, len(ids), tok.context_length)
        except OpenAIError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or f"router-{uuid.uuid4().hex}"
        return Prepared(rid, ids, sampling, "grpc_generate:stream")

    def Generate(self, request, context):
        prep = self._prepare(request, context)
        q: queue.SimpleQueue = queue.SimpleQueue()
        timeout = context.time_remaining()
        if timeout is not None and timeout > 1e7:  # no deadline: gRPC reports ~int64 max
            timeout = None
        core = self.core

        async def pump() -> None:
            try:
                async for d in core.run(prep, timeout):
                    chunk = common_pb2.TokenChunk(request_id=prep.request_id, token_ids=d.token_ids, text=d.text,
                                                  logprobs=d.logprobs, finish_reason=d.finish_reason,
                                                  matched_stop=d.matched_stop)
                    if d.usage is not None:
                        chunk.usage.CopyFrom(d.usage)
                    q.put(chunk)
            except RouterError as e:
                q.put(e)
            except Exception as e:  # a bug: report it instead of hanging the call
                q.put(RouterError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
            finally:
                q.put(_END)

        fut = asyncio.run_coroutine_threadsafe(pump(), self.loop())
        context.add_callback(fut.cancel)
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, RouterError):
                context.abort(item.code, item.message)
            yield item

    def ListWorkers(self, request, context):
        async def snapshot():
            return [w.to_proto() for w in self.core.pool.workers.values()]

        workers = asyncio.run_coroutine_threadsafe(snapshot(), self.loop()).result(timeout=5)
        return router_pb2.ListWorkersResponse(workers=workers, policy=self.core.config.routing_policy)
