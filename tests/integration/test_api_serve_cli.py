"""`ukgpu serve` as a user runs it: a subprocess that loads the model, answers, and stops on SIGINT."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_loads_answers_and_stops(smollm2_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "ukgpu.tools.cli", "serve", "-m", str(smollm2_path),
           "--port", str(port), "--slots", "1", "--ctx", "128", "--backend", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        statuses = set()
        deadline = time.monotonic() + 300
        while "ready" not in statuses:
            assert proc.poll() is None and time.monotonic() < deadline, "server never got ready"
            try:
                statuses.add(httpx.get(url + "/health").json()["status"])
            except httpx.TransportError:
                time.sleep(0.1)
        model = smollm2_path.stem
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == model
        resp = httpx.post(url + "/v1/completions", timeout=300,
                          json={"model": model, "prompt": "Hello", "max_tokens": 2})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode in (0, 130), output
