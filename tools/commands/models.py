"""`ukgpu models list|pull`: the known models and the local cache."""

from __future__ import annotations

import argparse

from ukgpu.llama_core.models import registry


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list known models or pull one into the cache")
    verbs = parser.add_subparsers(dest="models_command", metavar="ACTION")
    verbs.required = True
    listing = verbs.add_parser("list", help="known models, whether cached, and where")
    listing.set_defaults(func=_list)
    puller = verbs.add_parser("pull", help="download, assemble and verify a known model")
    puller.add_argument("name", help=f"one of: {', '.join(registry.KNOWN_MODELS)}")
    puller.add_argument("--force", action="store_true", help="download again even if cached")
    puller.set_defaults(func=_pull)


def _human(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


def _list(args: argparse.Namespace) -> int:
    rows = [("NAME", "ARCH", "QUANT", "SIZE", "CACHED", "PATH")]
    for model in registry.KNOWN_MODELS.values():
        path = registry.model_path(model.name)
        cached = path.is_file()
        size = path.stat().st_size if cached else model.size
        rows.append((model.name, model.arch, model.quant, _human(size), "yes" if cached else "no", str(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _pull(args: argparse.Namespace) -> int:
    path = registry.pull(args.name, force=args.force)
    print(path)
    return 0
