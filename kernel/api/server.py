"""Run an app with uvicorn on the pure-Python stack (asyncio loop, h11 HTTP parser).

Every connection has read deadlines and the server a connection cap (`limits.ServerLimits`,
`deadlines.deadline_protocol`): a request line, headers or a body that does not arrive in time
closes its connection, and a request on a connection beyond `max_connections` gets 503.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from ukgpu.kernel.api.limits import ServerLimits


def config(app: Any, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
           limits: ServerLimits | None = None):
    import uvicorn

    from ukgpu.kernel.api.deadlines import deadline_protocol

    limits = limits or ServerLimits()
    # the connection cap is the protocol's (a JSON 503), not uvicorn's limit_concurrency (plain text)
    return uvicorn.Config(app, host=host, port=port, loop="asyncio", http=deadline_protocol(limits),
                          ws="none", lifespan="on", log_level=log_level, timeout_keep_alive=limits.keep_alive)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
          limits: ServerLimits | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    uvicorn.Server(config(app, host, port, log_level, limits)).run()


@contextlib.contextmanager
def background(app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0,
               limits: ServerLimits | None = None) -> Iterator[str]:
    """Serve `app` from a thread while the block runs; yields the base URL (port 0: any free one)."""
    import uvicorn

    server = uvicorn.Server(config(app, host, port, log_level="warning", limits=limits))
    thread = threading.Thread(target=server.run, name="ukgpu-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(start_timeout)
