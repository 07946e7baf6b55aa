"""OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions
(SSE streaming with `stream: true`), /health and /metrics.

Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}. Streaming requests
wait for the first output before answering, so a request that cannot be served still gets a
real HTTP status (503 + Retry-After, 400, ...) instead of an error inside a 200 stream.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from tandem.router.core import Delta, NoHealthyWorker, Prepared, PromptInput, RouterCore, RouterError, UnknownModel
from tandem.routing import embeddings as emb
from tandem.routing import openai_protocol as oa
from tandem.sampling import SamplingError

log = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}


def router_error_to_openai(e: RouterError) -> oa.OpenAIError:
    if isinstance(e, NoHealthyWorker):
        return oa.unavailable(e.message)
    status = _HTTP_STATUS.get(e.code, 500)
    if status == 429:
        return oa.OpenAIError(429, e.message, "rate_limit_error", None, "rate_limit_exceeded", {"Retry-After": "1"})
    if status == 503:
        return oa.unavailable(e.message)
    if status == 400:
        return oa.bad_request(e.message)
    if status == 404:
        return oa.OpenAIError(404, e.message, "invalid_request_error", "model", "model_not_found")
    kind = "timeout_error" if status == 504 else "server_error"
    return oa.OpenAIError(status, e.message, kind, None, e.code.name.lower())


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> oa.OpenAIError:
    return oa.OpenAIError(413, f"request body larger than {limit} bytes (--max-request-bytes)",
                          "invalid_request_error", None, "request_too_large")


def client_key(request: Request) -> str:
    """Whom the per-key concurrency limit counts: the bearer token, else the client address."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + token.strip()
    return "addr:" + (request.client.host if request.client else "?")


async def _until_disconnect(request: Request, coro):
    """Run `coro`; cancel it (and so the worker call) if the HTTP client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


def build_http_app(core: RouterCore, registry: CollectorRegistry) -> FastAPI:
    """The OpenAI API over ``core``; ``registry`` is what ``/metrics`` exposes."""
    app = FastAPI(title="tandem router", docs_url=None, redoc_url=None, openapi_url=None)
    tok = core.tokenizer
    model_name = core.model_name
    created = oa.now()

    @app.exception_handler(oa.OpenAIError)
    async def _openai_error(_req: Request, e: oa.OpenAIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, e: StarletteHTTPException):
        err = oa.OpenAIError(e.status_code, str(e.detail), "invalid_request_error", None,
                             "not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, e: Exception):
        log.exception("internal error")
        err = oa.OpenAIError(500, f"Internal server error: {type(e).__name__}: {e}", "server_error", None,
                             "internal_error")
        return JSONResponse(err.body(), status_code=500)

    def check_auth(request: Request) -> None:
        peer = request.client.host if request.client else "?"
        if not core.api_key.allows(request.headers.get("authorization"), peer):
            raise oa.unauthorized()

    def check_model(name: str) -> str | None:
        """The LoRA adapter ``name`` selects (None: the base model); 404 for anything unknown. OpenAI's
        ``model`` is required over HTTP: an empty one is unknown (gRPC's unset field means the base)."""
        if not name:
            raise oa.model_not_found(name)
        try:
            return core.resolve_model(name)
        except UnknownModel as e:
            raise oa.model_not_found(name, e.message) from None

    @app.get("/health")
    async def health():
        healthy = len(core.pool.healthy()) if core.pool else 0
        body = {"status": "healthy" if healthy else "unhealthy", "healthy_workers": healthy,
                "workers": len(core.pool.workers) if core.pool else 0}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return oa.models_body(core.model_ids(), created, core.embedding_models())

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_auth(request)
        listed = {m["id"]: m for m in oa.models_body(core.model_ids(), created, core.embedding_models())["data"]}
        if name not in listed:
            check_model(name)  # 404 naming what is unknown (another base, an adapter no worker holds)
            raise oa.model_not_found(name)
        return listed[name]

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        check_auth(request)
        try:
            req = emb.parse_request(await read_body(request, cfg.max_request_bytes))
        except emb.EmbeddingInputError as e:
            raise oa.bad_request(str(e), param=e.param) from None
        try:
            model_used = core.embedding_model(req.model)
        except RouterError:
            raise oa.model_not_found(req.model) from None
        rid = request.headers.get("x-request-id") or oa.new_request_id("embedding")
        try:
            resp = await _until_disconnect(request, core.embed(model_used, req.inputs, req.dimensions, rid,
                                                               "embeddings", client_key(request)))
        except RouterError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:  # the worker names the field: "input[3]: ..."
                raise oa.bad_request(e.message, param=e.message.split(":", 1)[0]) from None
            raise router_error_to_openai(e) from None
        body = emb.response_body(resp.embeddings, model_used, resp.prompt_tokens, req.encoding_format)
        return JSONResponse(body, headers={"X-Request-Id": rid})

    cfg = core.config

    def prepare(kind: str, req, request: Request) -> Prepared:
        """The request in the router's terms (its prompt, its sampling side), then the one
        shared preparation (``RouterCore.prepare``)."""
        lora = check_model(req.model)
        plan = None
        if kind == "completion":
            prompt = oa.single_prompt(req)
            prompt_in = PromptInput(text=prompt) if isinstance(prompt, str) else PromptInput(token_ids=list(prompt))
            default_max = 16  # OpenAI's default for /v1/completions
        else:
            plan = oa.tool_plan(req, cfg.tool_call_parser)
            prompt_in = PromptInput(messages=[_message_dict(m) for m in req.messages], tools=plan.tools)
            default_max = None  # the rest of the context
        sampling = oa.sampling_request(req, default_max, plan)
        tool_parser = None
        if plan is not None and plan.choice == "auto":
            tool_parser = cfg.tool_call_parser
        elif plan is not None and plan.choice == "required":
            tool_parser = "required"
        elif plan is not None and plan.choice == "named":
            tool_parser = f"named:{plan.named}"
        rid = request.headers.get("x-request-id") or oa.new_request_id(kind)
        endpoint = ("completions" if kind == "completion" else "chat_completions") + (":stream" if req.stream else "")
        try:
            return core.prepare(prompt_in, sampling, rid, endpoint, client_key(request), tool_parser, lora)
        except SamplingError as e:
            raise oa.invalid(e) from None

    async def handle(kind: str, request: Request):
        check_auth(request)
        req = oa.parse_request(kind, await read_body(request, cfg.max_request_bytes))
        prep = prepare(kind, req, request)
        deltas = core_run(prep)
        headers = {"X-Request-Id": prep.request_id}
        # Wait for the first delta: errors before any output keep their HTTP status.
        try:
            first = await _until_disconnect(request, deltas.__anext__())
        except StopAsyncIteration:
            raise oa.OpenAIError(500, "worker returned no output", "server_error") from None
        except RouterError as e:
            await deltas.aclose()
            raise router_error_to_openai(e) from None
        except BaseException:
            await deltas.aclose()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream_body(kind, prep, first, deltas, include_usage)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            result = await _until_disconnect(request, _collect(kind, prep, first, deltas))
        except RouterError as e:
            raise router_error_to_openai(e) from None
        finally:
            await deltas.aclose()
        return JSONResponse(result, headers=headers)

    def core_run(prep: Prepared) -> AsyncIterator[Delta]:
        return core.run(prep)

    def formatter() -> oa.LogprobFormatter:
        return oa.LogprobFormatter(tok.token_text)

    def finish_name(prep: Prepared, d: Delta, had_calls: bool) -> str | None:
        """OpenAI's finish_reason; "tool_calls" when complete tool calls were parsed (as vLLM; not for a
        named tool_choice, where OpenAI answers "stop")."""
        name = oa.finish_reason_name(d.finish_reason)
        if had_calls and name in ("stop", "length") and not (prep.tool_parser or "").startswith("named:"):
            return "tool_calls"
        return name

    async def _collect(kind: str, prep: Prepared, first: Delta, deltas) -> dict:
        n = prep.n
        texts: list[list[str]] = [[] for _ in range(n)]
        reasoning: list[list[str]] = [[] for _ in range(n)]
        calls: list[list] = [[] for _ in range(n)]
        lp_parts: list[list] = [[] for _ in range(n)]
        chat_lps: list[list] = [[] for _ in range(n)]
        fmts = [formatter() for _ in range(n)]
        last: list[Delta | None] = [None] * n
        want_lp = prep.sampling.logprobs
        d: Delta | None = first
        done = 0
        while d is not None:
            i = d.index
            texts[i].append(d.text)
            reasoning[i].append(d.reasoning)
            calls[i] += d.tool_calls
            if want_lp and d.prompt_logprobs:
                lp_parts[i].append(fmts[i].prompt(prep.input_ids, d.prompt_logprobs, prep.sampling.top_logprobs))
            if want_lp and d.logprobs:
                if kind == "completion":
                    lp_parts[i].append(fmts[i].completion(d.token_ids, d.logprobs, prep.sampling.top_logprobs))
                else:
                    chat_lps[i] += fmts[i].chat(d.token_ids, d.logprobs)
            last[i] = d
            if d.finish_reason:
                done += 1
                if done == n:
                    break
            d = await deltas.__anext__()
        choices = []
        for i in range(n):
            finish = finish_name(prep, last[i], bool(calls[i]))
            text = "".join(texts[i])
            if kind == "completion":
                lp = oa.merge_completion_logprobs(lp_parts[i]) if want_lp else None
                choices.append(oa.completion_choice(i, text, finish, lp))
            else:
                choices.append(oa.chat_choice(i, text if text or not calls[i] else None, finish,
                                              chat_lps[i] if want_lp else None,
                                              "".join(reasoning[i]) if prep.reasoning_parser else None, calls[i]))
        usage = _usage(prep, last)
        if kind == "completion":
            return oa.completion_body(prep.request_id, model_name, oa.now(), choices, usage)
        return oa.chat_body(prep.request_id, model_name, oa.now(), choices, usage)

    def _usage(prep: Prepared, last: list) -> dict:
        """Prompt counted once, completion tokens of every sample, cached tokens of sample 0."""
        us = [d.usage for d in last if d is not None and d.usage is not None]
        if not us:
            return oa.usage_body(len(prep.input_ids), 0)
        return oa.usage_body(us[0].prompt_tokens, sum(u.completion_tokens for u in us), us[0].cached_tokens)

    async def _stream_body(kind: str, prep: Prepared, first: Delta, deltas, include_usage: bool):
        n = prep.n
        fmts = [formatter() for _ in range(n)]
        want_lp = prep.sampling.logprobs
        created_at = oa.now()
        rid = prep.request_id
        last: list[Delta | None] = [None] * n
        ncalls = [0] * n
        try:
            if kind == "chat":
                for i in range(n):
                    yield _sse(oa.chat_chunk(rid, model_name, created_at, i, {"role": "assistant", "content": ""},
                                             None))
            d: Delta | None = first
            done = 0
            while d is not None:
                i = d.index
                last[i] = d
                ncalls[i] += len(d.tool_calls)
                finish = finish_name(prep, d, ncalls[i] > 0) if d.finish_reason else None
                if d.text or finish or d.reasoning or d.tool_calls or (want_lp and d.logprobs):
                    if kind == "completion":
                        parts = []
                        if want_lp and d.prompt_logprobs:
                            parts.append(fmts[i].prompt(prep.input_ids, d.prompt_logprobs, prep.sampling.top_logprobs))
                        if want_lp and d.logprobs:
                            parts.append(fmts[i].completion(d.token_ids, d.logprobs, prep.sampling.top_logprobs))
                        lp = oa.merge_completion_logprobs(parts)
                        yield _sse(oa.completion_chunk(rid, model_name, created_at, i, d.text, finish, lp))
                    else:
                        lp = fmts[i].chat(d.token_ids, d.logprobs) if want_lp and d.logprobs else None
                        delta: dict = {"content": d.text} if d.text else {}
                        if d.reasoning:
                            delta["reasoning_content"] = d.reasoning
                        if d.tool_calls:
                            delta["tool_calls"] = oa.tool_calls_body(d.tool_calls, ncalls[i] - len(d.tool_calls))
                        yield _sse(oa.chat_chunk(rid, model_name, created_at, i, delta, finish, lp))
                if d.finish_reason:
                    done += 1
                    if done == n:
                        break
                d = await deltas.__anext__()
            if include_usage and any(x is not None and x.usage is not None for x in last):
                yield _sse(oa.usage_chunk(rid, model_name, created_at, kind, _usage(prep, last)))
        except RouterError as e:
            # Headers are gone: report the error in the stream, as vLLM and SGLang do.
            yield _sse(router_error_to_openai(e).body())
        except StopAsyncIteration:
            pass
        finally:
            await deltas.aclose()
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle("chat", request)

    return app


def _message_dict(m: oa.ChatMessageIn) -> dict:
    d: dict = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d
