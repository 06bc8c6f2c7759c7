"""Read deadlines for uvicorn's h11 protocol: headers and bodies arrive in time or the
connection goes.

uvicorn (0.55) closes idle keep-alive connections (`timeout_keep_alive`), but it has no
deadline for a request still arriving: a client that sends half a request line, headers without
their blank line, or a body that never ends holds its connection forever.  `deadline_protocol`
returns a subclass of `H11Protocol` with two timers and a connection cap:

- the header deadline runs from the connection's start, and again from the end of each
  response (the next pipelined or keep-alive request), to the end of the request's headers.
  When it fires on a connection that sent part of a request, the client gets a 408 (JSON, the
  API's error shape) and the connection closes; one that sent nothing is closed silently, like
  an idle keep-alive connection.
- the body deadline runs from the end of the headers to the end of the body.  When it fires the
  connection closes; the application sees the client disconnect (`http.disconnect`), which it
  counts as such rather than as a server error.

- the connection cap: a connection made while `max_connections` others are open is served by a
  one-line app that answers every request 503 (JSON, the API's error shape, `Retry-After: 1`)
  and closes.  (uvicorn's own `limit_concurrency` answers a plain-text 503 that clients cannot
  parse as an API error.)

- half-closed clients: a client that sends a whole request and then shuts down its sending side
  (`shutdown(SHUT_WR)`, as `curl`-style one-shot clients and some proxies do) still gets its
  answer.  The server sees the same end-of-file when a client goes away entirely, so at EOF it
  writes one `100 Continue` (every HTTP/1.1 client skips it) and looks `HALF_CLOSE_PROBE` seconds
  later: a socket closed for good has answered with a reset, and the request is dropped as a
  disconnect (freeing its slot); otherwise the response is sent and the connection closed.

All are logged as one warning line, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ukgpu.kernel.api.errors import error_body
from ukgpu.kernel.api.limits import ServerLimits

log = logging.getLogger(__name__)

HALF_CLOSE_PROBE = 0.1  # seconds from the probe write to the look for a reset (loopback: microseconds)


def timeout_response(seconds: float) -> bytes:
    """A complete HTTP/1.1 408 with an OpenAI-shaped body, closing the connection."""
    body = json.dumps(error_body(f"The request did not arrive within {seconds:g} s; send it whole and "
                                 "promptly.", "invalid_request_error", None, "request_timeout")).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


def connections_full_app(max_connections: int) -> Any:
    """An ASGI app answering 503 (JSON, closing the connection): the server holds its cap."""
    body = json.dumps(error_body(f"The server has {max_connections} connections open, its cap; retry "
                                 "shortly or reuse a keep-alive connection.", "server_error", None,
                                 "too_many_connections")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1"), (b"connection", b"close")]

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol with the header and body deadlines of `limits` (see the module docstring)."""

    limits = ServerLimits()
    _timer: asyncio.TimerHandle | None = None
    _timer_kind: str | None = None  # "headers" | "body" while a deadline runs
    _got_bytes = False  # since the last response: an idle connection closes without a 408
    _half_closed = False  # the client sent EOF after a whole request: close after the response

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:  # the set includes this one
            log.warning("%s: %d connections open, the cap; its requests get 503", _peer(self),
                        self.limits.max_connections)
            self.app = connections_full_app(self.limits.max_connections)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol allows a bool
        """Keep a half-closed connection open while its whole request is answered (see the module
        docstring); any other EOF closes the transport (asyncio does so on a falsy return)."""
        cycle = self.cycle
        if self.conn.their_state is not h11.DONE or cycle is None or cycle.response_complete:
            return None
        self._half_closed = True
        if not cycle.response_started and self.conn.our_state is h11.SEND_RESPONSE:
            self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        self.loop.call_later(HALF_CLOSE_PROBE, self._gone_after_eof)
        return True

    def _gone_after_eof(self) -> None:
        """Drop the request when the probe was answered with a reset (the client closed for good)."""
        sock = self.transport.get_extra_info("socket")
        if self.transport.is_closing() or sock is None:
            return
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.transport.abort()  # connection_lost: the application sees http.disconnect

    def handle_events(self) -> None:
        waiting_headers = self.conn.their_state is h11.IDLE
        super().handle_events()
        if waiting_headers and self.conn.their_state is h11.SEND_BODY:
            self._arm("body")
        elif waiting_headers and self.conn.their_state is not h11.IDLE:
            self._disarm()  # a whole request without a body (or an error already answered)
        elif self.conn.their_state is not h11.SEND_BODY and self._timer_kind == "body":
            self._disarm()  # the body ended

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._half_closed:
            self.transport.close()
            return
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._got_bytes = False
            self._arm("headers")

    def _arm(self, kind: str) -> None:
        self._disarm()
        if kind == "body":
            self._timer = self.loop.call_later(self.limits.body_timeout, self._body_late)
        else:
            self._timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)
        self._timer_kind = kind

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_kind = None, None

    def _headers_late(self) -> None:
        self._timer, self._timer_kind = None, None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._got_bytes:
            log.warning("%s: request headers not complete after %g s; answered 408",
                        _peer(self), self.limits.header_timeout)
            self.transport.write(timeout_response(self.limits.header_timeout))
        self.transport.close()

    def _body_late(self) -> None:
        self._timer, self._timer_kind = None, None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        log.warning("%s: request body not complete after %g s; connection closed",
                    _peer(self), self.limits.body_timeout)
        self.transport.close()


def deadline_protocol(limits: ServerLimits) -> type[H11Protocol]:
    """A `DeadlineH11Protocol` subclass enforcing `limits` (uvicorn instantiates the class)."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"limits": limits})


def _peer(protocol: H11Protocol) -> str:
    client = protocol.client
    return f"{client[0]}:{client[1]}" if client else "a client"
