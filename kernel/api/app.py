"""The Starlette application: routes, body limits, error shapes, engine loading."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ukgpu.kernel.api import embeddings, engine_facts, generation, logprobs, openapi, schema, security, structured
from ukgpu.kernel.api.body_text import check_text
from ukgpu.kernel.api.engine_protocol import ServedEngine
from ukgpu.kernel.api.errors import ApiError, bad_request, model_failed, model_loading
from ukgpu.kernel.api.limits import ApiLimits
from ukgpu.kernel.api.metrics import CLIENT_CLOSED, Metrics
from ukgpu.kernel.api.prompt_bound import check_prompt_chars, with_prompt_bound
from ukgpu.kernel.api.scheduler import Scheduler
from ukgpu.kernel.api.validate import validate

log = logging.getLogger(__name__)


class EngineHost:
    """The engine, its scheduler and what the schemas need to know; loads in the background."""

    def __init__(self, engine_or_loader: ServedEngine | Callable[[], ServedEngine],
                 limits: ApiLimits, model_id: str, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.facts = schema.ModelFacts(model_id)
        self.engine: ServedEngine | None = None
        self.scheduler: Scheduler | None = None
        self.failure: str | None = None
        if callable(engine_or_loader):
            threading.Thread(target=self._load, args=(engine_or_loader,),
                             name="ukgpu-model-load", daemon=True).start()
        else:
            self._attach(engine_or_loader)

    def _load(self, loader: Callable[[], ServedEngine]) -> None:
        try:
            self._attach(loader())
        except Exception as exc:  # reported by /health and every generation request
            log.exception("model load failed")
            self.failure = f"{type(exc).__name__}: {exc}"

    def _attach(self, engine: ServedEngine) -> None:
        scheduler = Scheduler(engine, self.limits.max_queue, self.metrics)
        scheduler.start()
        self.limits = with_prompt_bound(self.limits, engine.n_ctx, engine.tokenizer)
        self.facts = engine_facts.model_facts(engine, self.facts.model_id)
        self.engine, self.scheduler = engine, scheduler

    @property
    def status(self) -> str:
        if self.scheduler is not None and not self.scheduler.alive:
            self.failure = self.failure or f"the generation loop stopped ({self.scheduler.failure or 'shut down'})"
            return "failed"
        return "ready" if self.scheduler else ("failed" if self.failure else "loading")

    def require_ready(self) -> tuple[ServedEngine, Scheduler]:
        if self.engine is None or self.scheduler is None:
            raise model_failed(self.failure) if self.failure else model_loading()
        return self.engine, self.scheduler

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


def _endpoint(handler):
    """Turn ApiError into its OpenAI-shaped response and anything else into a 500."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return JSONResponse(exc.body(), exc.status, headers=exc.headers)
        except ClientDisconnect:  # gone mid-body: no one to answer; /metrics counts it as 499
            log.info("client disconnected before its request body ended on %s", request.url.path)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:
            log.exception("unexpected error on %s", request.url.path)
            err = ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error")
            return JSONResponse(err.body(), 500)

    return wrapped


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object in the body; 413 as soon as the body is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"The body is not valid JSON ({exc}); send a JSON object.",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_json")
    check_text(body)  # a lone surrogate is not text: 400 before anything echoes or tokenizes it
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"The body is {size} bytes or more; this server accepts at most {limit}. "
                    "Send a shorter prompt.", code="body_too_large")


def create_app(engine_or_loader: ServedEngine | Callable[[], ServedEngine],
               limits: ApiLimits | None = None, *, model_id: str = "ukgpu",
               arena: Any = None, policy: security.Policy | security.Gate | None = None,
               health_extra: dict | None = None) -> _CountRequests:
    """The API around an engine (`engine_protocol.ServedEngine`: `llama_core.engine.Engine`), or
    around a zero-argument loader that returns one.  Its slot count is the engine's.

    With a loader the server answers at once: /health says "loading" (503) until
    the engine is ready.  `arena` (kernel.arena.Arena) adds its usage to /metrics.
    `policy` (security.Policy): API key and allowed Host/Origin; default: local names, no key;
    a security.Gate: the same, changeable while serving (and sealable).
    `health_extra`: fields every /health answer carries (the guest: whether its image was checked).
    """
    limits = limits or ApiLimits()
    metrics = Metrics()
    host = EngineHost(engine_or_loader, limits, model_id, metrics)
    routes = _routes(host, arena, health_extra or {})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        host.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error},
                    lifespan=lifespan)
    guarded = security.guard(app, policy or security.Policy())
    return _CountRequests(guarded, metrics, {r.path for r in routes})


def _routes(host: EngineHost, arena: Any, health_extra: dict) -> list[Route]:
    limits = host.limits

    async def generate(request: Request, kind: generation.Kind) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        engine, scheduler = host.require_ready()
        check_prompt_chars(kind.chat, body, host.limits)  # before tokenizing: O(characters)
        if isinstance(body.get("model"), str) and body["model"] != host.facts.model_id:
            raise ApiError(404, f"The model '{body['model']}' does not exist here; this server "
                           f"serves '{host.facts.model_id}' (see GET /v1/models).",
                           param="model", code="model_not_found")
        request_schema = (schema.chat_request if kind.chat else schema.completion_request)
        body = validate(request_schema(host.facts, limits), body)
        ids = await run_in_threadpool(generation.prompt_ids, engine, kind, body)
        top_k = logprobs.asked(kind.chat, body)  # alternatives per token; None: no logprobs
        job_args = {  # the context check (max_tokens) comes before the sampler's
            "prompt_ids": ids,
            "max_tokens": generation.max_new_tokens(engine, kind, body, len(ids), host.facts, limits),
            "params": engine_facts.sampling_params(body, top_k), "stop": generation.stop_list(body)}
        job_args["params"] = await run_in_threadpool(structured.constrain, engine, body, job_args["params"])
        gen = generation.Generation(scheduler, kind, host.facts.model_id, job_args,
                                    want_logprobs=top_k is not None,
                                    n=body["n"] or 1,  # the schema bounds n by the slots
                                    tools=kind.chat and structured.tools_on(body))
        if body["stream"]:
            return gen.stream(bool((body.get("stream_options") or {}).get("include_usage")))
        return await gen.respond(request)

    async def completions(request: Request) -> Response:
        return await generate(request, generation.COMPLETION)

    async def chat(request: Request) -> Response:
        return await generate(request, generation.CHAT)

    async def models(request: Request) -> Response:
        card = {"id": host.facts.model_id, "object": "model", "created": 0, "owned_by": "ukgpu"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        status = host.status
        body = {"status": status, **health_extra}
        if host.failure is not None:
            body["error"] = host.failure
        engine = host.engine if status == "ready" else None
        if engine is not None and engine.model.backend is not None:
            body["backend"] = engine.model.backend.name  # which device answers, and why
            body["backend_note"] = engine.backend_note  # (a run-time fallback says so)
        return JSONResponse(body, 200 if status == "ready" else 503)

    async def metrics(request: Request) -> Response:
        scheduler = host.scheduler
        gauges: dict[str, tuple[str, float]] = {
            "ukgpu_queue_depth": ("Requests waiting for a slot.",
                                  scheduler.queue_depth if scheduler else 0),
            "ukgpu_active_slots": ("Sequences being generated.",
                                   scheduler.active_slots if scheduler else 0),
            "ukgpu_slots": ("Parallel sequence slots.", scheduler.n_slots if scheduler else 0),
        }
        text = host.metrics.render(gauges, arena)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def tokenize(request: Request) -> Response:
        body = validate(schema.tokenize_request(host.limits), await read_json(request, limits.max_body_bytes))
        engine, _ = host.require_ready()
        ids = await run_in_threadpool(engine.tokenizer.encode, body["content"],
                                      add_special=body["add_special"])
        return JSONResponse({"tokens": [int(i) for i in ids]})

    async def detokenize(request: Request) -> Response:
        raw = await read_json(request, limits.max_body_bytes)
        engine, _ = host.require_ready()
        body = validate(schema.detokenize_request(host.facts), raw)
        text = await run_in_threadpool(engine.tokenizer.decode, body["tokens"])
        return JSONResponse({"content": text})

    async def embed(request: Request) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        engine, scheduler = host.require_ready()
        body = validate(embeddings.request_schema(host.facts, host.limits), body)
        return await embeddings.respond(scheduler, engine, body, host.facts.model_id)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi.build(host.facts, limits))

    table = [
        ("/v1/completions", completions, ["POST"]),
        ("/v1/chat/completions", chat, ["POST"]),
        ("/v1/embeddings", embed, ["POST"]),
        ("/v1/models", models, ["GET"]),
        ("/health", health, ["GET"]),
        ("/metrics", metrics, ["GET"]),
        ("/tokenize", tokenize, ["POST"]),
        ("/detokenize", detokenize, ["POST"]),
        ("/openapi.json", openapi_json, ["GET"]),
    ]
    return [Route(path, _endpoint(fn), methods=methods) for path, fn, methods in table]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # the app registers it for HTTPException alone
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}. "
                   "See GET /openapi.json for the endpoints.", type=kind)
    return JSONResponse(err.body(), exc.status_code, headers=exc.headers)


class _CountRequests:
    """ASGI wrapper counting responses by path and status for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths
        self.in_flight = 0  # HTTP requests inside the app now (a guest waits for 0 to snapshot)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(path, message["status"])
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.in_flight -= 1
