"""`ukgpu image build`: a bootable VM image (kernel + initramfs + manifest) serving one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ukgpu.kernel.guest.arena import parse_size
from ukgpu.kernel.image import build as image


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="build the unikernel image for a model")
    verbs = parser.add_subparsers(dest="image_command", metavar="ACTION")
    verbs.required = True
    build = verbs.add_parser("build", help="build (or reuse from the cache) an image",
                             description="Build vmlinux + initramfs.cpio + manifest for MODEL. "
                             "Same inputs give the same bytes; builds are cached by input hash.")
    build.add_argument("-m", "--model", default=image.DEFAULT_MODEL,
                       help=f"known model name or .gguf path (default {image.DEFAULT_MODEL})")
    build.add_argument("-o", "--out", type=Path, help="also put the image files in this folder")
    build.add_argument("--kernel", type=Path,
                       help="kernel to boot (bzImage/vmlinuz or vmlinux; default: Debian's 6.1)")
    build.add_argument("--embed-limit", default="200M",
                       help="models up to this size go into the initramfs, larger ones on a "
                       "read-only disk (default 200M)")
    build.add_argument("--no-numba", dest="numba", action="store_false",
                       help="leave numba/llvmlite out (-210 MiB; the CPU backend must not need them)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    config = image.BuildConfig(model=args.model, out=args.out, kernel=args.kernel,
                               embed_limit=parse_size(args.embed_limit), numba=args.numba,
                               force=args.force)
    built = image.build(config, log=lambda msg: print(msg, file=sys.stderr))
    print(built.dir)
    return 0
