"""`ukgpu chat`: an interactive conversation with a model's own chat template.

Each turn renders the whole conversation and generates the reply, streaming
it; `/exit` (or end of input) leaves, `/reset` forgets the conversation.  The
engine's slot keeps the keys and values of the conversation so far between
turns, so turn N evaluates only what the template adds after the last reply (the
new user message and its markers); the statistics line after each turn says how
many prompt tokens came from that cache.
"""

from __future__ import annotations

import argparse
import sys

from ukgpu.llama_core.engine import Engine
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.tools import argtypes
from ukgpu.tools.commands.generate import (
    add_model_args,
    add_sampling_args,
    load_engine,
    run,
    sampling_params,
    stats_line,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="talk with a model interactively (/exit leaves)")
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("-n", "--n-predict", type=argtypes.positive, default=512, metavar="N",
                        help="reply length limit in tokens (default 512)")
    parser.add_argument("--system", default=None, help="a system message opening the conversation")
    parser.set_defaults(func=_chat)


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def _opening(args: argparse.Namespace) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    engine = load_engine(args)
    params = sampling_params(args)
    messages = _opening(args)
    print("ukgpu chat: /exit to leave, /reset to start over", file=sys.stderr)
    while (line := _read("> ")) is not None:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = _opening(args)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply = _reply(engine, messages, params, args.n_predict)
        if reply is None:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": reply})
    return 0


def _reply(engine: Engine, messages: list[dict], params, n_predict: int) -> str | None:
    """Stream one reply; None (after saying why) when the turn cannot run."""
    try:
        ids = engine.chat_ids(messages)
        text, reason, stats = run(engine, ids, params, max(1, min(n_predict, engine.n_ctx - len(ids))), [])
    except UkgpuError as exc:
        print(f"ukgpu: {exc}", file=sys.stderr)
        return None
    print(f"{stats_line(stats, reason)} | cached: {stats.cached_tokens} tokens", file=sys.stderr)
    return text
