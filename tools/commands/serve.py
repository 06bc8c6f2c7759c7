"""`ukgpu serve -m MODEL`: the OpenAI-compatible HTTP API on this machine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ukgpu.llama_core.models import registry
from ukgpu.tools import argtypes
from ukgpu.tools.commands.generate import add_cpu_activations_arg, apply_cpu_activations


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API")
    parser.add_argument("-m", "--model", required=True, help="known model name or GGUF path")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=argtypes.port, default=8080, help="TCP port (default 8080)")
    parser.add_argument("--slots", type=argtypes.int_in(1, 256), default=4, help="sequences generated in parallel")
    parser.add_argument("--ctx", type=argtypes.ctx, default=2048, help="context size per slot, in tokens")
    parser.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="auto")
    add_cpu_activations_arg(parser)
    parser.add_argument("--max-queue", type=argtypes.positive, default=64,
                        help="requests that may wait for a slot before new ones get 429")
    parser.add_argument("--max-body", type=argtypes.positive, default=1 << 20, help="largest request body, bytes")
    parser.add_argument("--max-tokens", type=argtypes.positive, default=None,
                        help="largest max_tokens a request may ask for (default: the context)")
    add_server_limits(parser)
    add_security_options(parser)
    parser.set_defaults(func=_serve)


def add_security_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but "
                        "/health (default: $UKGPU_API_KEY; none: no key)")
    parser.add_argument("--api-key-file", metavar="PATH", help="read the API key from this file")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="accept this Host name besides localhost, 127.0.0.1, [::1] and the "
                        "--host address (repeatable)")
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from this origin (scheme://host[:port]) call the API "
                        "(repeatable; default: none)")


def add_server_limits(parser: argparse.ArgumentParser) -> None:
    """Prompt and connection limits (kernel/api/limits.py says why each exists)."""
    from ukgpu.kernel.api.limits import ServerLimits

    d = ServerLimits()
    parser.add_argument("--max-prompt-chars", type=argtypes.positive, default=None, metavar="N",
                        help="refuse longer prompts before tokenizing (default: the context times "
                        "the longest vocabulary entry, which no prompt that fits exceeds)")
    parser.add_argument("--max-connections", type=argtypes.positive, default=d.max_connections,
                        help=f"connections served at once; a request on one more gets 503 "
                        f"(default {d.max_connections})")
    parser.add_argument("--header-timeout", type=argtypes.seconds, default=d.header_timeout, metavar="S",
                        help=f"seconds for a request's line and headers to arrive (default {d.header_timeout:g})")
    parser.add_argument("--body-timeout", type=argtypes.seconds, default=d.body_timeout, metavar="S",
                        help=f"seconds for a request's body to arrive (default {d.body_timeout:g})")
    parser.add_argument("--keep-alive", type=argtypes.positive, default=d.keep_alive, metavar="S",
                        help=f"seconds an idle keep-alive connection stays open (default {d.keep_alive:g})")


def server_limits(args: argparse.Namespace):
    from ukgpu.kernel.api.limits import ServerLimits

    return ServerLimits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                        body_timeout=args.body_timeout, keep_alive=args.keep_alive)


def model_id(name_or_path: str) -> str:
    """The id clients send as `model`: the registry name, or the file's stem for a path."""
    return name_or_path if name_or_path in registry.KNOWN_MODELS else Path(name_or_path).stem


def security_policy(args: argparse.Namespace, env=os.environ):
    """The API key and allowed names from the flags; SystemExit with the reason when unusable."""
    from ukgpu.kernel.api import security

    try:
        key = security.resolve_key(args.api_key, args.api_key_file, env)
    except ValueError as exc:
        raise SystemExit(f"ukgpu serve: error: {exc}") from None
    if key is None and not security.is_loopback(args.host):
        print(f"ukgpu serve: warning: listening on {args.host} without an API key: anyone who can "
              "reach the port can use the model; give --api-key or --api-key-file", file=sys.stderr)
    return security.policy_for(args.host, key, args.allowed_host, args.allowed_origin)


def _serve(args: argparse.Namespace) -> int:
    from ukgpu.kernel.api import ApiLimits, create_app, serve

    path = registry.resolve_model(args.model)  # a bad name fails here, before listening
    apply_cpu_activations(args)

    def load():
        from ukgpu.llama_core.cpu.compile import ensure_compiled
        from ukgpu.llama_core.engine import Engine

        if args.backend != "cuda":  # before the first request, not inside it
            ensure_compiled(sys.stderr)
        return Engine.load(path, backend=args.backend, n_ctx=args.ctx, n_slots=args.slots)

    limits = ApiLimits(max_body_bytes=args.max_body, max_queue=args.max_queue,
                       max_tokens=args.max_tokens, max_prompt_chars=args.max_prompt_chars)
    app = create_app(load, limits, model_id=model_id(args.model), policy=security_policy(args))
    serve(app, args.host, args.port, limits=server_limits(args))
    return 0
