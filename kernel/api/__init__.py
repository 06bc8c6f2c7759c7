"""The OpenAI-compatible HTTP API: `create_app(engine_or_loader, limits)` and `serve(app, host, port)`."""

from ukgpu.kernel.api.app import create_app
from ukgpu.kernel.api.limits import ApiLimits
from ukgpu.kernel.api.server import serve

__all__ = ["ApiLimits", "create_app", "serve"]
