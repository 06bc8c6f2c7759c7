"""/v1/completions and /v1/chat/completions: request -> job -> JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ukgpu.kernel.api import engine_facts, logprobs, structured
from ukgpu.kernel.api.engine_protocol import ServedEngine, TokenEvent
from ukgpu.kernel.api.errors import ApiError, bad_request, error_body
from ukgpu.kernel.api.limits import ApiLimits
from ukgpu.kernel.api.scheduler import Failed, Finished, Job, Scheduler
from ukgpu.kernel.api.schema import ModelFacts, max_tokens_cap
from ukgpu.kernel.api.tool_stream import ToolStream

_DISCONNECTED = object()  # queue item: the client went away


@dataclass(frozen=True)
class Kind:
    """What differs between the completion and the chat flavours."""

    chat: bool
    id_prefix: str
    object_name: str
    chunk_object: str


COMPLETION = Kind(False, "cmpl-", "text_completion", "text_completion")
CHAT = Kind(True, "chatcmpl-", "chat.completion", "chat.completion.chunk")


@dataclass
class Outcome:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens reused from a slot's KV cache
    logprobs: list = field(default_factory=list)  # each token's TokenLogprob, when asked
    n_sent: int = 0  # of those, already in stream chunks
    sent_chars: int = 0  # characters of the tokens already sent (completions' text_offset)


def prompt_ids(engine: ServedEngine, kind: Kind, body: dict) -> list[int]:
    """Token ids of the prompt (chat: the engine's own `chat_ids`).  Runs in a request thread:
    tokenizing a long prompt must not hold up the scheduler's."""
    if kind.chat:
        ids = engine_facts.chat_ids(engine, [_plain_message(m) for m in body["messages"]],
                                    **structured.template_context(body))
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            ids = list(prompt)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            ids = list(engine.tokenizer.encode(text, add_special=True))
    if not ids:
        param = prompt_param(kind)
        raise bad_request(f"'{param}' encodes to no tokens; send some text.", param, "empty_prompt")
    return ids


def prompt_param(kind: Kind) -> str:
    """The request field that holds the prompt."""
    return "messages" if kind.chat else "prompt"


def _plain_message(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, list):
        content = "".join(part["text"] for part in content)
    return structured.template_message(message, content)


def max_new_tokens(engine: ServedEngine, kind: Kind, body: dict, n_prompt: int,
                   facts: ModelFacts, limits: ApiLimits) -> int:
    """Requested max_tokens (or the default), clipped to the room the engine says the prompt
    leaves in the context; a 400 when it leaves none."""
    room = engine_facts.room(engine, n_prompt, prompt_param(kind))
    asked = body.get("max_completion_tokens") if kind.chat else None
    asked = asked if asked is not None else body.get("max_tokens")
    cap = max_tokens_cap(facts, limits) or room  # a cap is always known once loaded
    if asked is None:
        asked = cap if kind.chat else min(limits.default_max_tokens, cap)
    return min(asked, room)


def stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class Generation:
    """One request's life: submit, then gather (non-streaming) or stream its events.

    `n` choices are n jobs (n slots, decoded together by the engine's `step_all`), job i
    sampling with seed + i when the request has a seed; the engine prefills the prompt once and
    copies its keys and values to the other choices (`Engine._share_prefix`).
    """

    def __init__(self, scheduler: Scheduler, kind: Kind, model_id: str, job_args: dict,
                 want_logprobs: bool = False, n: int = 1, tools: bool = False) -> None:
        self.scheduler = scheduler
        self.tools = tools  # parse chat replies for tool calls (structured.tools_on)
        self.want_logprobs = want_logprobs
        self.kind = kind
        self.model_id = model_id
        self.id = kind.id_prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.jobs = [Job(deliver=self._deliverer(loop, i),
                         **{**job_args, "params": engine_facts.seeded(job_args["params"], i)})
                     for i in range(n)]
        self.n_prompt = len(job_args["prompt_ids"])
        try:
            for job in self.jobs:
                scheduler.submit(job)
        except BaseException:  # a full queue: none of the choices runs
            self.cancel()
            raise

    def _deliverer(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[object], object]:
        return lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))

    def cancel(self) -> None:
        for job in self.jobs:
            self.scheduler.cancel(job)

    async def _items(self) -> AsyncIterator[tuple[int, Sequence[TokenEvent] | Finished | Failed]]:
        """(choice index, engine output) in order until every job ends; cancels them all when one
        fails or the consumer stops."""
        running = len(self.jobs)
        try:
            while running:
                item = await self.queue.get()
                if item is _DISCONNECTED:
                    return
                yield item
                if isinstance(item[1], Failed):
                    return
                running -= isinstance(item[1], Finished)
        finally:
            self.cancel()

    async def respond(self, request: Request) -> JSONResponse:
        watcher = asyncio.create_task(self._watch_disconnect(request))
        outcomes = [Outcome() for _ in self.jobs]
        try:
            async for index, item in self._items():
                if isinstance(item, Failed):
                    raise engine_failure(item.error)
                self._absorb(outcomes[index], item)
        finally:
            watcher.cancel()
        if any(o.finish_reason is None for o in outcomes):  # the client left; nobody reads this
            return JSONResponse(error_body("client disconnected", "client_closed"), 499)
        return JSONResponse(self._result(outcomes))

    async def _watch_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.queue.put_nowait(_DISCONNECTED)

    def _absorb(self, outcome: Outcome, item: Sequence[TokenEvent] | Finished) -> str:
        """Fold events into `outcome`; returns the new text."""
        if isinstance(item, Finished):
            outcome.finish_reason = "length" if item.finish_reason == "length" else "stop"
            outcome.cached_tokens = item.cached_tokens
            return ""
        new = "".join(e.text for e in item)
        outcome.text += new
        outcome.completion_tokens += sum(1 for e in item if e.token_id is not None)
        outcome.logprobs += [e.logprob for e in item if e.logprob is not None]
        return new

    def _usage(self, outcomes: list[Outcome]) -> dict:
        """The prompt counted once, the tokens of every choice; cached: the first choice's."""
        done = sum(o.completion_tokens for o in outcomes)
        return {"prompt_tokens": self.n_prompt, "completion_tokens": done,
                "total_tokens": self.n_prompt + done,
                "prompt_tokens_details": {"cached_tokens": outcomes[0].cached_tokens}}

    def _envelope(self, object_name: str, *choices: dict) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model_id, "choices": list(choices)}

    def _result(self, outcomes: list[Outcome]) -> dict:
        choices = []
        for index, outcome in enumerate(outcomes):
            choice: dict = {"index": index, "finish_reason": outcome.finish_reason}
            if self.kind.chat:
                choice["message"] = {"role": "assistant", "content": outcome.text}
                if self.tools:
                    called = structured.tool_message(choice["message"], outcome.text)
                    choice["finish_reason"] = called or outcome.finish_reason
            else:
                choice.update(text=outcome.text, logprobs=None)
            if self.want_logprobs:
                choice["logprobs"] = self._logprobs_block(outcome.logprobs, 0)
            choices.append(choice)
        return {**self._envelope(self.kind.object_name, *choices), "usage": self._usage(outcomes)}

    def stream(self, include_usage: bool) -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        # The background task also covers a client that leaves before the first chunk.
        return StreamingResponse(self._sse(include_usage), media_type="text/event-stream",
                                 headers=headers,
                                 background=BackgroundTask(self.cancel))

    async def _sse(self, include_usage: bool) -> AsyncIterator[bytes]:
        outcomes = [Outcome() for _ in self.jobs]
        tool_streams = [ToolStream() for _ in self.jobs]
        if self.kind.chat:
            for index in range(len(outcomes)):
                yield _event(self._chunk(index, {"role": "assistant", "content": ""}, None))
        async for index, item in self._items():
            if isinstance(item, Failed):
                yield _event(engine_failure(item.error).body())
                break
            outcome = outcomes[index]
            new = self._absorb(outcome, item)
            if self.tools:  # content as it settles, each call when its block closes
                stream = tool_streams[index]
                deltas = stream.feed(outcome.text, bool(outcome.finish_reason))
                for delta in deltas[:-1]:
                    yield _event(self._chunk(index, delta, None))
                if deltas or outcome.finish_reason:
                    reason = stream.finish_reason(outcome.finish_reason) if outcome.finish_reason else None
                    yield _event(self._chunk(index, deltas[-1] if deltas else {}, reason,
                                             self._fresh_logprobs(outcome)))
                continue
            if new or outcome.finish_reason or len(outcome.logprobs) > outcome.n_sent:
                yield _event(self._chunk(index, new, outcome.finish_reason,
                                         self._fresh_logprobs(outcome)))
        if include_usage and all(o.finish_reason for o in outcomes):
            yield _event({**self._envelope(self.kind.chunk_object), "usage": self._usage(outcomes)})
        yield b"data: [DONE]\n\n"

    def _logprobs_block(self, entries: list, offset: int) -> dict:
        return (logprobs.chat_block(entries) if self.kind.chat
                else logprobs.completion_block(entries, offset))

    def _fresh_logprobs(self, outcome: Outcome) -> dict | None:
        """The logprobs of the tokens not yet streamed (None when not asked for)."""
        if not self.want_logprobs:
            return None
        fresh, offset = outcome.logprobs[outcome.n_sent:], outcome.sent_chars
        outcome.n_sent = len(outcome.logprobs)
        outcome.sent_chars += logprobs.text_length(fresh)
        return self._logprobs_block(fresh, offset)

    def _chunk(self, index: int, delta: str | dict, finish_reason: str | None,
               logprobs_block: dict | None = None) -> dict:
        choice: dict = {"index": index, "finish_reason": finish_reason}
        if self.kind.chat:
            choice["delta"] = delta if isinstance(delta, dict) else (
                {"content": delta} if delta else {})
        else:
            choice.update(text=delta, logprobs=None)
        if logprobs_block is not None:
            choice["logprobs"] = logprobs_block
        return self._envelope(self.kind.chunk_object, choice)


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def engine_failure(exc: BaseException) -> ApiError:
    return ApiError(500, f"The engine failed on this request: {type(exc).__name__}: {exc}",
                    type="server_error", code="engine_error")
