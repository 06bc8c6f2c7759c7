"""/v1/embeddings: OpenAI's request and response; the engine computes on the scheduler thread.

Request: `input` is a string, a list of strings, a list of token ids or a list of lists of
token ids; `encoding_format` "float" (default) or "base64" (the little-endian float32 bytes,
as OpenAI's client decodes them); `dimensions` is refused with a 400 naming it (the model's
width is the only one); `user` is accepted.  Bounds, published in /openapi.json: at most
`MAX_INPUTS` inputs; each input at most the context (n_ctx) tokens and all of them together at
most `MAX_TOTAL_TOKENS` (a 400 naming input beyond; they run in one scheduler pass, between
generation steps).  Text is tokenized with the model's BOS like a prompt.

Response: {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
"usage": {"prompt_tokens", "total_tokens"}}; each embedding is unit length
(`llama_core.embedding`: the pooled hidden state after the output norm).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from ukgpu.kernel.api.engine_protocol import ServedEngine
from ukgpu.kernel.api.errors import ApiError, bad_request
from ukgpu.kernel.api.limits import ApiLimits
from ukgpu.kernel.api.scheduler import Failed, Job, Scheduler
from ukgpu.kernel.api.schema import ModelFacts, _text, _token_ids

MAX_INPUTS = 64
MAX_TOTAL_TOKENS = 16384


def request_schema(facts: ModelFacts, limits: ApiLimits) -> dict:
    ids = {**_token_ids(facts), **({"maxItems": facts.n_ctx} if facts.n_ctx else {})}
    many = {"minItems": 1, "maxItems": MAX_INPUTS}
    return {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string", "enum": [facts.model_id]},
        "input": {"anyOf": [_text(limits), {"type": "array", "items": _text(limits), **many},
                            ids, {"type": "array", "items": ids, **many}],
                  "description": f"A text, texts, token ids or lists of token ids (at most "
                                 f"{MAX_INPUTS} inputs, {MAX_TOTAL_TOKENS} tokens in all)."},
        "encoding_format": {"type": ["string", "null"], "enum": ["float", "base64", None],
                            "default": "float"},
        "dimensions": {"enum": [None], "description": "Not supported: the model's width only.",
                       "x-hint": "This server does not support 'dimensions'; omit it."},
        "user": {"type": "string"},
    }}


def input_ids(engine: ServedEngine, body: dict) -> list[list[int]]:
    """Token ids of each input (a request thread: tokenizing may take a while); 400s past bounds."""
    raw = body["input"]
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    inputs = [list(x) if isinstance(x, list) else engine.tokenizer.encode(x, add_special=True)
              for x in raw]
    for i, ids in enumerate(inputs):
        if not ids or len(ids) > engine.n_ctx:
            raise bad_request(f"input {i} is {len(ids)} tokens; each input needs 1 to {engine.n_ctx} "
                              "(the context): shorten or split it.", "input", "context_length_exceeded")
    total = sum(len(ids) for ids in inputs)
    if total > MAX_TOTAL_TOKENS:
        raise bad_request(f"the inputs are {total} tokens in all; send at most {MAX_TOTAL_TOKENS} per "
                          "request (split them over several).", "input", "invalid_value")
    return inputs


async def respond(scheduler: Scheduler, engine: ServedEngine, body: dict, model_id: str) -> JSONResponse:
    inputs = await run_in_threadpool(input_ids, engine, body)
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(item: object) -> None:  # on the event loop; a request already gone has no reader
        if not done.done():
            done.set_result(item)

    def deliver(item: object) -> None:
        loop.call_soon_threadsafe(settle, item)

    job = Job(prompt_ids=[t for ids in inputs for t in ids], params=None, max_tokens=0, stop=[],
              deliver=deliver, task=lambda eng: [eng.embed(ids) for ids in inputs])
    scheduler.submit(job)
    try:
        result = await done
    finally:
        scheduler.cancel(job)  # a client gone before its turn: the task is dropped unrun
    if isinstance(result, Failed):
        raise ApiError(500, f"The engine failed on this request: {type(result.error).__name__}: "
                       f"{result.error}", type="server_error", code="engine_error")
    n = len(job.prompt_ids)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.get("encoding_format"))}
            for i, v in enumerate(result)]
    return JSONResponse({"object": "list", "data": data, "model": model_id,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})


def _encode(vector: Any, encoding: str | None) -> list[float] | str:
    v = np.asarray(vector, dtype="<f4")
    return base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()
