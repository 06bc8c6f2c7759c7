"""The scheduler thread survives what one request or one pass throws at it, and says when it cannot.

A tiny random-weight model whose tokenizer has fewer tokens (300) than its embedding rows (512)
samples ids the tokenizer cannot decode: each such sequence fails alone, with the tokenizer's
error, its slot released, while the scheduler keeps serving.
"""

from __future__ import annotations

import threading

import pytest

from ukgpu.kernel.api.errors import ApiError
from ukgpu.kernel.api.metrics import Metrics
from ukgpu.kernel.api.scheduler import Failed, Finished, Job, Scheduler
from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.gguf import synthetic
from ukgpu.llama_core.sampling import SamplingParams
from ukgpu.llama_core.text.tokenizer import TokenizerError

from fakes.tiny_models import SHAPES, tiny_spec

N_TOKENS = 300  # the tokenizer's size; the embedding has 512 rows


@pytest.fixture(scope="module")
def short_vocab_engine(tmp_path_factory):
    spec = tiny_spec(SHAPES["tiny-llama"])
    spec["metadata"]["tokenizer.ggml.eos_token_id"]["value"] = N_TOKENS - 1
    path = tmp_path_factory.mktemp("short") / "short-vocab.gguf"
    mp = pytest.MonkeyPatch()
    mp.setattr(synthetic, "vocabulary", lambda spec: (synthetic.minimal_vocab(N_TOKENS), "minimal"))
    synthetic.write_spec(spec, path, seed=1)
    mp.undo()
    engine = Engine.load(path, backend="cpu", n_ctx=64, n_slots=4)
    assert engine.tokenizer.vocab_size == N_TOKENS < engine.model.config.vocab_size
    return engine


class Collect:
    """A job's deliveries; `done` is set on its Finished or Failed."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self.done = threading.Event()

    def __call__(self, item: object) -> None:
        self.items.append(item)
        if isinstance(item, (Finished, Failed)):
            self.done.set()

    @property
    def end(self) -> object:
        return self.items[-1]


def _job(params: SamplingParams, max_tokens: int = 24) -> tuple[Job, Collect]:
    out = Collect()
    return Job([1, 2, 3], params, max_tokens, [], out), out


def _run(scheduler: Scheduler, jobs: list[tuple[Job, Collect]]) -> None:
    for job, _ in jobs:
        scheduler.submit(job)
    for _, out in jobs:
        assert out.done.wait(30), "a job never ended: the scheduler hangs"


def test_step_all_reports_an_undecodable_id_in_its_sequences_place(short_vocab_engine):
    engine = short_vocab_engine
    seqs = [engine.start([1, 2, 3], SamplingParams(temperature=5.0, seed=i), 24) for i in range(4)]
    try:
        results: list[object] = []
        for _ in range(24):  # never raises: each failure comes back in its place
            live = [s for s in seqs if s.finish_reason is None and s not in results]
            results += [s for s, r in zip(live, engine.step_all(live)) if isinstance(r, Exception)]
        assert results, "hot sampling over 512 rows with 300 tokens must hit an undecodable id"
    finally:
        for s in seqs:
            engine.release(s)


def test_undecodable_ids_fail_only_their_sequence(short_vocab_engine):
    engine = short_vocab_engine
    assert engine.model.backend.max_batch > 1  # the batched path (step_all -> _emit) is the one tested
    scheduler = Scheduler(engine, 16, Metrics())
    scheduler.start()
    try:
        sampled = [_job(SamplingParams(temperature=5.0, seed=i)) for i in range(4)]
        _run(scheduler, sampled)
        failed = [out.end for _, out in sampled if isinstance(out.end, Failed)]
        assert failed, "with 212 of 512 ids undecodable, hot sampling must hit one"
        assert all(isinstance(f.error, TokenizerError) and "outside the vocabulary" in str(f.error)
                   for f in failed)
        assert scheduler.alive and len(engine._free) == engine.n_slots  # every slot came back
        again = [_job(SamplingParams(temperature=5.0, seed=10 + i)) for i in range(4)]
        _run(scheduler, again)  # still serving
        assert scheduler.alive and len(engine._free) == engine.n_slots
    finally:
        scheduler.stop()


def test_a_failed_pass_fails_its_jobs_and_the_loop_goes_on(short_vocab_engine, monkeypatch):
    engine = short_vocab_engine
    scheduler = Scheduler(engine, 16, Metrics())
    real = engine.step_all
    calls = {"n": 0}

    def step_all_raising_once(seqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(seqs)

    monkeypatch.setattr(engine, "step_all", step_all_raising_once)
    scheduler.start()
    try:
        first = [_job(SamplingParams(temperature=0.0)) for _ in range(2)]
        _run(scheduler, first)
        assert all(isinstance(out.end, Failed) and "injected" in str(out.end.error) for _, out in first)
        assert len(engine._free) == engine.n_slots
        later = _job(SamplingParams(temperature=0.0), max_tokens=2)
        _run(scheduler, [later])
        assert not isinstance(later[1].end, Failed) or isinstance(later[1].end.error, TokenizerError)
        assert scheduler.alive
    finally:
        scheduler.stop()


def test_a_dead_loop_fails_waiting_jobs_and_refuses_new_ones(short_vocab_engine, monkeypatch):
    scheduler = Scheduler(short_vocab_engine, 16, Metrics())
    gate = threading.Event()

    def admit_then_die():
        gate.wait(10)
        raise SystemExit("injected: the loop cannot go on")

    monkeypatch.setattr(scheduler, "_admit", admit_then_die)
    scheduler.start()
    waiting = [_job(SamplingParams(temperature=0.0)) for _ in range(2)]
    for job, _ in waiting:
        scheduler.submit(job)
    gate.set()
    for _, out in waiting:
        assert out.done.wait(10) and isinstance(out.end, Failed)
    scheduler._thread.join(10)
    assert not scheduler.alive and "injected" in (scheduler.failure or "")
    with pytest.raises(ApiError) as refused:
        scheduler.submit(_job(SamplingParams())[0])
    assert refused.value.status == 503 and refused.value.code == "scheduler_stopped"


def test_health_says_failed_when_the_loop_died():
    import httpx
    from test_api_fakes import FakeEngine

    from ukgpu.kernel.api import create_app
    from ukgpu.kernel.api.server import background

    class DyingEngine(FakeEngine):
        def step_all(self, seqs):
            raise SystemExit("injected: the device is gone")

    with background(create_app(DyingEngine(), model_id="m")) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").json()["status"] == "ready"
        first = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert first.status_code == 500 and first.json()["error"]["type"] == "server_error"
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "injected" in health.json()["error"]
        later = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert later.status_code == 503 and later.json()["error"]["code"] == "scheduler_stopped"
