"""Bounded load test of the HTTP API: concurrent clients, every answer checked.

Each prompt's greedy answer is first fetched alone; then `--clients` threads
send `--requests` requests in total (prompts round-robin) and every answer
must equal its prompt's lone answer, none lost, within `--time-limit` seconds.
Prints p50/p99 latency and throughput; exits 1 on any mismatch or overrun.

    python tests/perf/load_api.py -m smollm2-135m --clients 8 --requests 200
    python tests/perf/load_api.py --url http://127.0.0.1:8080 --model-id smollm2-135m
    python tests/perf/load_api.py --fake-engine   # the server's own cost: an engine that costs nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import httpx

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "import numpy as np\n",
]


class LoadFailure(AssertionError):
    """An answer differed, went missing, or the run overran its time limit."""


def _complete(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    resp = client.post("/v1/completions", json=body)
    if resp.status_code != 200:
        raise LoadFailure(f"HTTP {resp.status_code} for {prompt!r}: {resp.text[:300]}")
    return resp.json()["choices"][0]["text"]


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int,
             time_limit: float, n_prompts: int = len(PROMPTS)) -> dict:
    """Run the load; returns the measurements or raises LoadFailure."""
    deadline = time.monotonic() + time_limit
    prompts = PROMPTS[:n_prompts]
    with httpx.Client(base_url=url, timeout=time_limit) as client:
        expected = {p: _complete(client, model, p, max_tokens) for p in prompts}
    latencies: list[float] = []
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            raise LoadFailure(f"time limit of {time_limit:.0f} s reached before request {i}")
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=max(1.0, deadline - time.monotonic()))
        prompt = prompts[i % len(prompts)]
        t0 = time.perf_counter()
        text = _complete(local.client, model, prompt, max_tokens)
        with lock:
            latencies.append(time.perf_counter() - t0)
        if text != expected[prompt]:
            raise LoadFailure(f"request {i} ({prompt!r}) got {text!r}, alone it was {expected[prompt]!r}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(requests)]
        done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - start
    errors = [f.exception() for f in done if f.exception() is not None]
    if errors:
        raise LoadFailure(f"{len(errors)} of {requests} requests failed; first: {errors[0]}")
    if len(latencies) != requests:
        raise LoadFailure(f"only {len(latencies)} of {requests} requests completed in {time_limit} s")
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": requests, "max_tokens": max_tokens,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(requests / elapsed, 2),
        "p50_s": round(statistics.median(ordered), 3),
        "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
        "max_s": round(ordered[-1], 3),
    }


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="smollm2-135m", help="model to serve in-process")
    p.add_argument("--url", help="test a running server instead of starting one")
    p.add_argument("--model-id", help="model id the running server expects (with --url)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--time-limit", type=float, default=900.0)
    p.add_argument("--fake-engine", action="store_true",
                   help="serve the deterministic test engine (tests/unit/test_api_fakes.py) instead")
    return p.parse_args()


def main() -> int:
    args = _parse()
    if args.url:
        return _report(args, args.url, args.model_id or args.model)
    from ukgpu.kernel.api import create_app
    from ukgpu.kernel.api.server import background
    from ukgpu.tools.commands.serve import model_id

    engine = _fake_engine(args) if args.fake_engine else _real_engine(args)
    with background(create_app(engine, model_id=model_id(args.model))) as url:
        return _report(args, url, model_id(args.model))


def _real_engine(args: argparse.Namespace):
    from ukgpu.llama_core.engine import Engine
    from ukgpu.llama_core.models.registry import resolve_model

    return Engine.load(resolve_model(args.model), backend=args.backend, n_ctx=args.ctx,
                       n_slots=args.slots)


def _fake_engine(args: argparse.Namespace):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
    from test_api_fakes import FakeEngine, use_fakes

    class Patch:  # use_fakes wants a monkeypatch-like setattr
        setattr = staticmethod(setattr)

    use_fakes(Patch)
    return FakeEngine(n_ctx=args.ctx, n_slots=args.slots)


def _report(args: argparse.Namespace, url: str, model: str) -> int:
    try:
        result = run_load(url, model, args.clients, args.requests, args.max_tokens, args.time_limit)
    except LoadFailure as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    with httpx.Client(base_url=url) as client:
        health = client.get("/health").json()
        tps = [ln for ln in client.get("/metrics").text.splitlines()
               if ln.startswith("ukgpu_generated_tokens_total")]
    print(json.dumps({**result, "health_after": health["status"], "metrics": tps}))
    return 0 if health["status"] == "ready" else 1


if __name__ == "__main__":
    sys.exit(main())
