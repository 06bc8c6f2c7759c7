"""`ukgpu ptx build|check|list`: regenerate, verify and list the precompiled GPU kernels."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ukgpu.ptx_kernels.loader import BUILD_DIR, Manifests


def register(subparsers) -> None:
    p = subparsers.add_parser("ptx", help="build / check / list the precompiled PTX+cubin kernels")
    sub = p.add_subparsers(dest="ptx_command", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="regenerate every artifact (Triton AOT, no GPU needed)")
    b.add_argument("--out", type=Path, default=BUILD_DIR, help="build root (default: the package's)")
    b.add_argument("--only", nargs="*", help="entry names to build (default: all)")
    b.add_argument("--stale", action="store_true",
                   help="compile only the entries whose sources changed since the last build")
    b.set_defaults(func=_build)
    c = sub.add_parser("check", help="artifacts fresh, assemble with ptxas, manifest matches PTX")
    c.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    c.add_argument("--no-ptxas", action="store_true", help="skip assembling each PTX")
    c.set_defaults(func=_check)
    ls = sub.add_parser("list", help="entries with grid, block and shared memory")
    ls.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    ls.set_defaults(func=_list)


def _build(args: argparse.Namespace) -> int:
    from ukgpu.ptx_kernels.generate import build

    t0 = time.time()
    written = build(args.out, args.only, stale=args.stale)
    for target, path in written.items():
        print(f"{target}: {path}")
    print(f"built in {time.time() - t0:.1f} s")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ukgpu.ptx_kernels.check import check

    t0 = time.time()
    problems = check(args.build_dir, run_ptxas=not args.no_ptxas)
    for p in problems:
        print(p, file=sys.stderr)
    n = len(Manifests.load(args.build_dir).names()) if not problems else 0
    print(f"ptx check: {len(problems)} problem(s){'' if problems else f', {n} entries ok'}"
          f" in {time.time() - t0:.1f} s")
    return 1 if problems else 0


def _list(args: argparse.Namespace) -> int:
    man = Manifests.load(args.build_dir)
    for name in man.names():
        e = man.entry(name)
        print(f"{name:24s} {e.kernel_name:22s} block {e.block[0]:4d} shared {e.shared_bytes:7d} "
              f"grid {', '.join(e.grid_exprs)}")
    return 0
