"""The OpenAI-compatible HTTP API: `create_app(engine_or_loader, limits)` and `serve(app, host, port)`.

The names are imported on first use, so that `ukgpu.kernel.api.limits` (which the command line's
parser reads for its defaults) imports without the web stack: `ukgpu ptx check` or `ukgpu verify`
on a machine without starlette still start."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ukgpu.kernel.api.app import create_app
    from ukgpu.kernel.api.limits import ApiLimits
    from ukgpu.kernel.api.server import serve

__all__ = ["ApiLimits", "create_app", "serve"]
_WHERE = {"ApiLimits": "limits", "create_app": "app", "serve": "server"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
