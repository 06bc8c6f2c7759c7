"""The OpenAI-compatible HTTP API: `create_app(engine_or_loader, limits)` and `serve(app, host, port)`."""

from .app import create_app
from .limits import ApiLimits
from .server import serve

__all__ = ["ApiLimits", "create_app", "serve"]
