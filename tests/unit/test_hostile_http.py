"""Hostile HTTP transport against a real uvicorn server on 127.0.0.1 (fake engine): partial
request lines, headers and bodies, idle and surplus connections, pipelining, oversized headers,
garbage.  Each connection is answered or closed within its deadline, no answer is a 5xx, the
server logs no traceback, and a normal request still answers in under a second.

Deadlines here are short (`LIMITS`) so the whole file runs in seconds; tests/fakes/http_attacks.py
holds the attacks, shared with tests/integration/test_api_attacks.py (the real model, longer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import time

import httpx
import pytest
from test_api_fakes import FakeEngine

from ukgpu.kernel.api import create_app
from ukgpu.kernel.api.limits import ServerLimits
from ukgpu.kernel.api.server import background

from fakes.http_attacks import connect, fuzz_round, read_until_closed, settle, status_of

MODEL = "fake-model"
LIMITS = ServerLimits(max_connections=8, header_timeout=0.5, body_timeout=0.5, keep_alive=1)
BODY = b'{"model": "fake-model", "prompt": "hi", "max_tokens": 2}'
REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class Tracebacks(logging.Handler):
    """Every log record carrying an exception, from the app's loggers and uvicorn's."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture
def server():
    seen = Tracebacks()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "ukgpu")]
    for lg in loggers:
        lg.addHandler(seen)
    try:
        with background(create_app(FakeEngine(), model_id=MODEL), limits=LIMITS) as url:
            host, port = url.removeprefix("http://").split(":")
            yield (host, int(port)), url, seen
    finally:
        for lg in loggers:
            lg.removeHandler(seen)
    assert not seen.records, [r.getMessage() for r in seen.records]


def normal_request_time(url: str) -> float:
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=5)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


@pytest.mark.parametrize("sent", [b"POS", b"POST /v1/completions HTT", b"GET /health HTTP/1.1\r\nHost: x\r\n"])
def test_a_request_that_stops_midway_gets_408_within_the_deadline(server, sent):
    addr, _, _ = server
    with connect(addr) as sock:
        sock.sendall(sent)
        data, took = read_until_closed(sock, 3)
    assert status_of(data) == 408 and b'"request_timeout"' in data
    assert 0.4 < took < 1.5


def test_an_idle_connection_is_closed_silently(server):
    addr, _, _ = server
    with connect(addr) as sock:
        data, took = read_until_closed(sock, 3)
    assert data == b"" and took < 1.5


def test_a_body_that_stops_midway_closes_the_connection(server):
    addr, url, _ = server
    with connect(addr) as sock:
        sock.sendall(REQUEST[:-10])
        data, took = read_until_closed(sock, 3)
    assert status_of(data) in (None, 408) and took < 1.5
    deadline = time.monotonic() + 2
    while 'status="499"' not in (metrics := httpx.get(url + "/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 'ukgpu_requests_total{path="/v1/completions",status="499"} 1' in metrics  # a disconnect
    assert 'status="500"' not in metrics


def test_a_slow_writer_within_the_deadline_is_answered(server):
    addr, _, _ = server
    with connect(addr) as sock:
        for k in range(0, len(REQUEST), len(REQUEST) // 4):
            sock.sendall(REQUEST[k:k + len(REQUEST) // 4])
            time.sleep(0.05)
        assert status_of(sock.recv(65536)) == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_client_still_gets_its_answer(server, stream):
    """shutdown(SHUT_WR) after a whole request: the answer comes (after one 100 Continue, which
    HTTP/1.1 clients skip), then the server closes the connection."""
    addr, _, _ = server
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": stream}).encode()
    with connect(addr) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.shutdown(socket.SHUT_WR)
        data, took = read_until_closed(sock, 3)
    assert took < 3, "the server kept the half-closed connection open after answering"
    statuses = [int(line.split(b" ", 2)[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert statuses[-1] == 200 and set(statuses) <= {100, 200}, data[:300]
    assert (b"data: [DONE]" in data) if stream else (b'"choices"' in data)


def test_pipelined_requests_are_all_answered(server):
    addr, _, _ = server
    with connect(addr) as sock:
        sock.sendall(REQUEST * 3)
        data, _ = read_until_closed(sock, 3)  # then the keep-alive deadline closes it
    assert data.count(b"HTTP/1.1 200 OK") == 3


def test_connections_beyond_the_cap_get_503_and_the_rest_go_on(server):
    addr, url, _ = server
    idle = [connect(addr) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.05)
        with connect(addr) as sock:
            sock.sendall(REQUEST)
            data, _ = read_until_closed(sock, 3)
        assert status_of(data) == 503
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"retry-after: 1" in head.lower() and b"application/json" in head.lower()
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.1)
    assert normal_request_time(url) < 1.0


@pytest.mark.parametrize("sent", [
    b"\x00\xff garbage \r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_requests_get_a_4xx_not_a_hang(server, sent):
    addr, _, _ = server
    with connect(addr) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(sent)
        data, took = read_until_closed(sock, 3)
    assert status_of(data) is None or 400 <= status_of(data) < 500, data[:200]
    assert took < 1.5


def test_fuzzed_connections_settle_and_normal_requests_stay_fast(server):
    addr, url, _ = server
    rng = random.Random(1234)
    for _ in range(3):
        socks = fuzz_round(addr, REQUEST, rng, 6)
        assert normal_request_time(url) < 1.0  # during the attack
        settle(socks, 3.0)
    assert normal_request_time(url) < 1.0  # after it


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "\\ud800", "prompt": "hi"}', "model"),
    (b'{"model": "fake-model", "prompt": ["ok", "x\\udfff"]}', "prompt[1]"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, raw, param):
    _, url, _ = server
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, "invalid_text", "invalid_request_error")


def test_guest_options_set_the_connection_limits():
    from ukgpu.kernel.api.limits import server_limits_from

    limits = server_limits_from({"max_connections": "10", "header_timeout": "2.5", "api_key": "k"})
    assert (limits.max_connections, limits.header_timeout, limits.body_timeout) == (10, 2.5, 60.0)
    for bad in ({"keep_alive": "soon"}, {"max_connections": "0"}, {"body_timeout": "-1"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            server_limits_from(bad)
