"""One thread owns the engine and interleaves every active sequence, one step each in turn.

Requests wait in a bounded queue until a slot is free.  Each `Job` hands its
results to the asyncio side through `deliver`, a thread-safe callback; a job
whose client went away is cancelled and its slot freed before its next step.
The engine starts each job in the free slot whose KV cache already holds the
longest prefix of its prompt (a chat resending its history) and evaluates only
the rest; `Finished` says how many prompt tokens that saved.

The slot count is the engine's own (`engine.n_slots`, from `--slots` or
`ukgpu.slots=`): the API has no second number that could admit a sequence the
engine has no slot for.

Which thread calls what on the engine (`engine_protocol.ServedEngine`):
- "ukgpu-model-load" (when the app got a loader) builds it and starts the
  scheduler; nothing else sees the engine before;
- the scheduler thread ("ukgpu-scheduler"), and no other, calls `start`,
  `step_all` and `release`: they own the KV slots and the model's device;
- Starlette's thread pool (one request thread each) tokenizes: `chat_ids`,
  `tokenizer.encode` / `decode`, several at once.  Never the scheduler thread:
  a long prompt takes a while to tokenize and would stall every sequence;
- the event loop reads the constants `n_ctx` and `n_slots`, asks `room`
  (which reads only `n_ctx`) and, for /health, the backend facts;
- the event loop submits and cancels jobs and reads the gauges; results come
  back to it through `deliver`.

Supervision: a failure of one sequence comes back from `step_all` in its place and fails that
job alone.  Anything else a pass of the loop raises (a bug, an engine call that raised instead
of reporting) fails the jobs of that pass with a 500, releases their slots and the loop goes on
with the next request.  If the loop itself cannot continue (`_admit` raised, or a
`BaseException`), `failure` says why, every waiting job fails, `submit` answers 503 and /health
reports "failed" instead of "ready": a dead scheduler never leaves requests hanging.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ukgpu.kernel.api.engine_protocol import ServedEngine, TokenEvent
from ukgpu.kernel.api.errors import queue_full, scheduler_stopped
from ukgpu.kernel.api.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """Sent once when a job ends normally (its last events carried the finish reason).
    cached_tokens: prompt tokens the engine reused from a slot's KV cache instead of
    evaluating them (OpenAI's usage.prompt_tokens_details.cached_tokens)."""

    finish_reason: str
    cached_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    """Sent once when the engine raised on this job."""

    error: BaseException


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: Any  # llama_core.sampling.SamplingParams
    max_tokens: int
    stop: list[str]
    deliver: Callable[[object], object]  # events | Finished | Failed; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq: Any = None  # the engine's sequence handle once started
    task: Callable[[Any], object] | None = None  # instead of generating: one call on the engine,
    # its result delivered (embeddings); it runs on this thread between steps and holds no slot

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, engine: ServedEngine, max_queue: int, metrics: Metrics) -> None:
        if engine.n_slots < 1:
            raise ValueError(f"the engine has {engine.n_slots} slots: load it with at least one")
        self.engine = engine
        self.n_slots = engine.n_slots  # never more sequences than the engine has slots
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.failure: str | None = None  # why the loop stopped serving; None while it serves
        self._thread = threading.Thread(target=self._run, name="ukgpu-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_slots(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        """Queue `job`; raises a 429 `ApiError` when the queue is full."""
        with self._wake:
            if self.failure is not None:
                raise scheduler_stopped(self.failure)
            if len(self._pending) >= self.max_queue:
                raise queue_full(self.max_queue)
            self._pending.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._wake:
            self._wake.notify()

    @property
    def alive(self) -> bool:
        """True while the loop serves (before `start` too); False once it has stopped or died."""
        return self.failure is None and (self._thread.ident is None or self._thread.is_alive())

    def _run(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return
                try:
                    for job in admitted:
                        self._start(job)
                    self._step_all()
                except Exception as exc:  # noqa: BLE001 - fail this pass's jobs, keep serving
                    log.exception("a scheduler pass failed; failing its requests and going on")
                    self._fail([*admitted, *self._active], exc)
        except BaseException as exc:
            log.critical("the scheduler stopped: %s: %s", type(exc).__name__, exc, exc_info=True)
            with self._wake:
                self.failure = f"{type(exc).__name__}: {exc}"
                stranded, self._pending = [*self._pending, *self._active], deque()
            self._fail(stranded, exc)  # logged above; nothing above this thread to raise to

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        """Fail each job (a job in both lists once), releasing the slot of any that had one."""
        for job in dict.fromkeys(jobs):
            if job in self._active:
                self._retire(job)
            _send(job, Failed(exc))

    def _admit(self) -> list[Job] | None:
        """Wait for work; move queued jobs into free slots. None means stop."""
        with self._wake:
            while not self._stopping and not self._pending and not self._active:
                self._wake.wait()
            if self._stopping:
                return None
            self._pending = deque(j for j in self._pending if not j.cancelled.is_set())
            admitted: list[Job] = []
            while self._pending and len(self._active) + len(admitted) < self.n_slots:
                admitted.append(self._pending.popleft())
            return admitted

    def _start(self, job: Job) -> None:
        if job.task is not None:
            try:
                _send(job, job.task(self.engine))
            except Exception as exc:  # this task failed; others go on
                _send(job, Failed(exc))
            return
        try:
            job.seq = self.engine.start(job.prompt_ids, job.params, job.max_tokens, job.stop)
        except Exception as exc:  # the engine refused this request; others go on
            _send(job, Failed(exc))
            return
        self.metrics.count_prompt(len(job.prompt_ids))
        self._active.append(job)

    def _step_all(self) -> None:
        """One step of every active job; the engine decodes them together where it can."""
        for job in [j for j in self._active if j.cancelled.is_set()]:
            self._retire(job)
        jobs = list(self._active)
        for job, result in zip(jobs, self.engine.step_all([j.seq for j in jobs])):
            if isinstance(result, Exception):
                self._retire(job)
                _send(job, Failed(result))
            else:
                self._deliver(job, result)

    def _deliver(self, job: Job, events: Sequence[TokenEvent]) -> None:
        self.metrics.count_generated(sum(1 for e in events if e.token_id is not None))
        if events:
            _send(job, events)
        reason = next((e.finish_reason for e in events if e.finish_reason), None)
        if reason is not None:
            self._retire(job)
            _send(job, Finished(reason, job.seq.stats.cached_tokens))

    def _retire(self, job: Job) -> None:
        self._active.remove(job)
        try:
            self.engine.release(job.seq)
        except Exception:  # a failed release must not stop the other sequences
            log.exception("engine.release failed; the slot may stay busy")


def _send(job: Job, item: object) -> None:
    """Deliver to the request's event loop; a loop already closed (shutdown) drops the job."""
    try:
        job.deliver(item)
    except RuntimeError:
        job.cancel()
