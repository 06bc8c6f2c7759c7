"""Hostile HTTP clients on raw sockets, for tests/unit/test_hostile_http.py and
tests/integration/test_api_attacks.py: partial requests, garbage, pipelining, idle and
half-closed connections, and the check that the server settles every one of them."""

from __future__ import annotations

import contextlib
import random
import socket
import time


def connect(addr) -> socket.socket:
    sock = socket.create_connection(addr, timeout=5)
    sock.settimeout(5)
    return sock


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    t0, data = time.monotonic(), b""
    sock.settimeout(within)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - t0


def status_of(data: bytes) -> int | None:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def fuzz_round(addr, request: bytes, rng: random.Random, n: int) -> list[socket.socket]:
    """Open n hostile connections (left for the server to settle); returns their sockets."""
    socks = []
    for _ in range(n):
        sock = connect(addr)
        cut = rng.randrange(len(request) + 1)
        kind = rng.choice(["partial", "garbage", "pipelined", "idle", "halfclose", "whole"])
        with contextlib.suppress(OSError):
            if kind == "partial":
                sock.sendall(request[:cut])
            elif kind == "garbage":
                sock.sendall(rng.randbytes(rng.randrange(1, 2000)))
            elif kind == "pipelined":
                sock.sendall(request * 2 + request[:cut])
            elif kind == "halfclose":
                sock.sendall(request[:cut])
                sock.shutdown(socket.SHUT_WR)
            elif kind == "whole":
                sock.sendall(request)
        socks.append(sock)
    return socks


def settle(socks: list[socket.socket], within: float) -> None:
    """Every socket is answered or closed by the server within `within` seconds, never a 5xx."""
    for sock in socks:
        data, took = read_until_closed(sock, within)
        for status in (int(line.split(b" ", 2)[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")):
            assert status < 500 or status == 503, data[:300]
        assert took < within, f"a connection neither answered nor closed: {took:.2f} s, got {data[:200]!r}"
        sock.close()
