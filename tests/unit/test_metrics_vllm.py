"""/metrics under vLLM's names (what request routers score backends by), through the real app and
server with the fake engine: the values follow the scheduler while requests run and queue."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from test_api_fakes import FakeEngine, use_fakes

from ukgpu.kernel.api import ApiLimits, create_app
from ukgpu.kernel.api.metrics import Metrics
from ukgpu.kernel.api.server import background

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
VLLM = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def parse(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page; every family must declare HELP and TYPE first."""
    declared: dict[str, set[str]] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name = line.split()[1:3]
            declared.setdefault(name, set()).add(kind)
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        name, labels, value = match.groups()
        assert declared.get(name) == {"HELP", "TYPE"}, f"{name} has no HELP/TYPE before its sample"
        if labels is None:
            samples[name] = float(value)
    return samples


def _wait_for(url: str, expected: dict[str, float], timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as c:
        while True:
            seen = parse(c.get("/metrics").text)
            if all(seen.get(k) == v for k, v in expected.items()):
                return seen
            assert time.monotonic() < deadline, f"metrics never reached {expected}: {seen}"
            time.sleep(0.02)


@pytest.mark.parametrize("n_slots, n_requests", [(4, 3), (2, 3)])
def test_vllm_gauges_follow_the_scheduler(monkeypatch, n_slots, n_requests):
    use_fakes(monkeypatch)
    engine = FakeEngine(n_slots=n_slots, n_ctx=256, delay=0.05)
    running = min(n_slots, n_requests)
    expected = {"vllm:num_requests_running": running,
                "vllm:num_requests_waiting": n_requests - running,
                "vllm:kv_cache_usage_perc": running / n_slots}
    statuses: list[int] = []

    def send(url: str) -> None:
        body = {"model": "ukgpu", "prompt": "hello", "max_tokens": 12}
        statuses.append(httpx.post(url + "/v1/completions", json=body, timeout=30).status_code)

    with background(create_app(engine, ApiLimits(max_queue=4))) as url:
        idle = _wait_for(url, {"vllm:kv_cache_usage_perc": 0.0}, timeout=5)
        threads = [threading.Thread(target=send, args=(url,)) for _ in range(n_requests)]
        for t in threads:
            t.start()
        busy = _wait_for(url, expected, timeout=10)
        for t in threads:
            t.join(30)
        done = _wait_for(url, dict.fromkeys(VLLM, 0.0), timeout=5)
    assert statuses == [200] * n_requests
    assert idle["vllm:num_requests_running"] == 0 and idle["vllm:num_requests_waiting"] == 0
    # the vLLM names mirror ukgpu's own gauges on the same page
    assert busy["vllm:num_requests_running"] == busy["ukgpu_active_slots"]
    assert busy["vllm:num_requests_waiting"] == busy["ukgpu_queue_depth"]
    assert 0.0 <= busy["vllm:kv_cache_usage_perc"] <= 1.0
    assert done["ukgpu_generated_tokens_total"] == 12 * n_requests


def test_vllm_names_absent_without_scheduler_gauges():
    text = Metrics().render({"other": ("x", 1.0)})
    assert not any(name in text for name in VLLM)
    text = Metrics().render({"ukgpu_queue_depth": ("q", 3), "ukgpu_active_slots": ("a", 0), "ukgpu_slots": ("s", 0)})
    assert parse(text)["vllm:kv_cache_usage_perc"] == 0.0  # no slots: no division by zero
    assert parse(text)["vllm:num_requests_waiting"] == 3
