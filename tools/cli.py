"""`ukgpu` entry point.

Every subcommand lives in its own module `ukgpu.tools.commands.<name>` that defines
`register(subparsers)`; the parser is assembled from whatever modules exist, so
adding a command never touches this file.  A command handler returns an exit
code; a `UkgpuError` escaping it is printed as one clear line (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.tools.commands import __path__ as _commands_path


def _command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_commands_path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ukgpu",
        description="Run a GGUF model in a minimal VM: CPU reference, CUDA passthrough, OpenAI API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _command_modules():
        module = importlib.import_module(f"ukgpu.tools.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UkgpuError as exc:
        print(f"ukgpu: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ukgpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
