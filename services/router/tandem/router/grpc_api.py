"""gRPC Router service (tandem.v1.Router), served by the process's ``grpc.aio`` server on the
router's own event loop (``ServiceRuntime(aio=True)``): a call runs where ``RouterCore`` runs,
with no thread hop per request or per streamed chunk.

The request carries what the OpenAI API offers: sampling parameters (penalties, logit
bias, structured output), n samples (chunks carry their index), echo, tools and
tool_choice (calls come back parsed in TokenChunk.tool_calls), and the router's reasoning
parser fills TokenChunk.reasoning_text.

Each Generate call reads the worker's stream in a pump task that hands chunks to the call's
handler, which writes them, through a bounded window (``stall.SendWindow``); a client that takes
no message for --stream-stall-timeout seconds has its worker request cancelled and its call
ended with CANCELLED. When the RPC ends early
(client cancel or deadline) gRPC cancels the handler, which cancels the pump task, which cancels
the worker's Generate call. The caller's deadline is passed on to the worker call.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import grpc
from tandem.router.core import Prepared, PromptInput, RouterCore, RouterError, UnknownModel
from tandem.router.stall import SendStalled, SendWindow
from tandem.routing.embeddings import EmbeddingInputError, check_dimensions, check_inputs
from tandem.routing.openai_protocol import OpenAIError
from tandem.routing.request_check import SamplingRequest
from tandem.routing.sampling import sampling_from_proto
from tandem.routing.tool_parsers import Tool, check_tool_name, forced_schema
from tandem.sampling import StructuredOutput
from tandem.v1 import common_pb2, router_pb2, router_pb2_grpc

# Chunks handed to the writer and not yet written, per call: a client that stops reading holds
# back the worker's stream (flow control) instead of filling an unbounded queue.
SEND_WINDOW = 16

UNAUTHENTICATED = "incorrect or missing API key: send 'authorization: Bearer <key>' metadata"


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Coroutines for a ``grpc.aio`` server on the loop where ``core`` runs."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core

    def _prepare(self, request: router_pb2.RouterGenerateRequest, context) -> Prepared:
        """The request in the router's terms (its prompt, its sampling side), then the one
        shared preparation (``RouterCore.prepare``); RouterError for a request that cannot run."""
        core = self.core
        try:
            lora = core.resolve_model(request.model)
        except UnknownModel as e:
            raise RouterError(grpc.StatusCode.NOT_FOUND, e.message) from None
        try:
            prompt, sampling, tool_parser = self._convert(request, core.config.tool_call_parser)
            rid = request.request_id or f"router-{uuid.uuid4().hex}"
            return core.prepare(prompt, sampling, rid, "grpc_generate:stream", client_key(context), tool_parser,
                                lora)
        except OpenAIError as e:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, e.message) from None
        except ValueError as e:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    @staticmethod
    def _convert(request: router_pb2.RouterGenerateRequest, parser: str | None
                 ) -> tuple[PromptInput, SamplingRequest, str | None]:
        """(prompt, sampling side, tool parser) of a Router API request; ValueError naming the problem."""
        kind = request.WhichOneof("prompt")
        tools, tool_parser, forced = _tools(request, parser)
        if kind == "text":
            prompt = PromptInput(text=request.text)
        elif kind == "chat":
            if not request.chat.messages:
                raise ValueError("chat has no messages")
            prompt = PromptInput(messages=[_message(m) for m in request.chat.messages], tools=tools)
        elif kind == "token_ids":
            prompt = PromptInput(token_ids=list(request.token_ids.ids))
        else:
            raise ValueError("no prompt: set one of text, chat or token_ids")
        if request.echo and kind == "chat":
            raise ValueError("echo: only for text and token_ids prompts")
        if tools and kind != "chat":
            raise ValueError("tools: only for chat prompts")
        sp = sampling_from_proto(request.sampling)
        structured = [("sampling.structured", sp.structured)] if sp.structured is not None else []
        if forced is not None:
            structured.append(("tool_choice", StructuredOutput("json_schema", json.dumps(forced))))
        # Proto zero values: max_tokens 0 means the rest of the context (common.proto).
        return prompt, SamplingRequest(sp, n=request.n or 1, max_tokens_given=request.sampling.max_tokens != 0,
                                       structured=structured, echo=request.echo), tool_parser

    async def Generate(self, request, context):
        core = self.core
        if not core.api_key.allows(_authorization(context), peer_host(context.peer())):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        try:
            prep = self._prepare(request, context)
        except RouterError as e:
            await context.abort(e.code, e.message)
        timeout = _time_remaining(context)
        stall_timeout = core.config.stream_stall_timeout
        events = core.metrics.stall_events("grpc", stall_timeout)
        window = SendWindow(SEND_WINDOW, stall_timeout, events.write_waited)
        calls: dict[int, int] = {}  # tool calls sent so far, per sample

        async def pump() -> None:
            error: RouterError | None = None
            drop = False
            deltas = core.run(prep, timeout)
            try:
                async for d in deltas:
                    chunk = common_pb2.TokenChunk(
                        request_id=prep.request_id, token_ids=d.token_ids, text=d.text, logprobs=d.logprobs,
                        finish_reason=d.finish_reason, matched_stop=d.matched_stop, index=d.index,
                        reasoning_text=d.reasoning, prompt_logprobs=d.prompt_logprobs,
                        tool_calls=[common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments, index=k)
                                    for k, c in enumerate(d.tool_calls, start=calls.get(d.index, 0))])
                    calls[d.index] = calls.get(d.index, 0) + len(d.tool_calls)
                    if d.usage is not None:
                        chunk.usage.CopyFrom(d.usage)
                    await window.put(chunk)
            except SendStalled:
                events.stalled(f"{context.peer()} (request {prep.request_id})", f"{SEND_WINDOW} messages")
                error, drop = RouterError(grpc.StatusCode.CANCELLED, f"the client took no message for "
                                          f"{stall_timeout:g} s (--stream-stall-timeout)"), True
            except RouterError as e:
                error = e
            except Exception as e:  # a bug: report it instead of hanging the call
                error = RouterError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            finally:
                window.close(error, drop_pending=drop)
                await deltas.aclose()  # cancels the worker's call: it frees the request's pages

        pumping = asyncio.create_task(pump())
        try:
            async for item in window.items():
                if isinstance(item, RouterError):
                    await context.abort(item.code, item.message)
                await context.write(item)
        finally:
            pumping.cancel()

    async def Embed(self, request: router_pb2.RouterEmbedRequest, context) -> router_pb2.RouterEmbedResponse:
        """The inputs' embeddings from an embedding worker of the model (``RouterCore.embed``)."""
        core = self.core
        if not core.api_key.allows(_authorization(context), peer_host(context.peer())):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        inputs = list(request.inputs)
        try:
            check_inputs(inputs)
            dimensions = check_dimensions(request.dimensions or None)
        except EmbeddingInputError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or f"router-embd-{uuid.uuid4().hex}"
        try:
            model = core.embedding_model(request.model)
            resp = await core.embed(model, inputs, dimensions, rid, "grpc_embed", client_key(context),
                                    _time_remaining(context))
        except RouterError as e:
            await context.abort(e.code, e.message)
        return router_pb2.RouterEmbedResponse(embeddings=resp.embeddings, model=model, request_id=rid,
                                              usage=common_pb2.Usage(prompt_tokens=resp.prompt_tokens))

    async def ListWorkers(self, request, context):
        return router_pb2.ListWorkersResponse(workers=[w.to_proto() for w in self.core.pool.workers.values()],
                                              policy=self.core.config.routing_policy)


def _authorization(context) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")


def _time_remaining(context) -> float | None:
    """The call's deadline in seconds from now; None without one."""
    timeout = context.time_remaining()
    return None if timeout is None or timeout > 1e7 else timeout  # no deadline: gRPC may report ~int64 max


def client_key(context) -> str:
    """Whom the per-key concurrency limit counts: the bearer token, else the peer's host."""
    scheme, _, token = (_authorization(context) or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + token.strip()
    return "addr:" + peer_host(context.peer()).split(":", 1)[-1]


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' -> 'ipv4:127.0.0.1' (one log line per host, not per connection)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def _message(m: router_pb2.ChatMessage) -> dict:
    d: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                           for c in m.tool_calls]
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


def _tools(request: router_pb2.RouterGenerateRequest, parser: str | None):
    """(tools, the Prepared tool_parser, the forcing JSON schema or None); ValueError naming the problem."""
    choice = request.tool_choice or ("auto" if request.tools else "none")
    if not request.tools:
        if choice not in ("none", "auto"):
            raise ValueError(f"tool_choice={choice!r} requires tools")
        return [], None, None
    tools = []
    for t in request.tools:
        check_tool_name(t.name)
        try:
            params = json.loads(t.parameters_json) if t.parameters_json else None
        except ValueError as e:
            raise ValueError(f"tool {t.name}: parameters_json is not JSON: {e}") from None
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ValueError(f"tool {t.name}: parameters_json must be a JSON schema of type object")
        tools.append(Tool(t.name, t.description, params))
    if len({t.name for t in tools}) != len(tools):
        raise ValueError("tools: function names must be unique")
    if choice == "none":
        return tools, None, None
    if choice == "auto":
        if parser is None:
            raise ValueError("tool_choice 'auto' needs the router's --tool-call-parser; use 'required' or a tool name")
        return tools, parser, None
    if choice == "required":
        return tools, "required", forced_schema(tools, "required")
    if choice not in {t.name for t in tools}:
        raise ValueError(f"tool_choice={choice!r}: not one of the tools")
    return tools, f"named:{choice}", forced_schema(tools, choice)
