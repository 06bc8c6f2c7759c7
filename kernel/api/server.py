"""Run an app with uvicorn on the pure-Python stack (asyncio loop, h11 HTTP parser)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


def config(app: Any, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, loop="asyncio", http="h11",
                          ws="none", lifespan="on", log_level=log_level, timeout_keep_alive=30)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    uvicorn.Server(config(app, host, port, log_level)).run()


@contextlib.contextmanager
def background(app: Any, host: str = "127.0.0.1", port: int = 0,
               start_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` from a thread while the block runs; yields the base URL (port 0: any free one)."""
    import uvicorn

    server = uvicorn.Server(config(app, host, port, log_level="warning"))
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
