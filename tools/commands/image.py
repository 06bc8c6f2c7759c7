"""`ukgpu image build`: a bootable VM image (kernel, stage-1 initramfs, dm-verity root disk) serving one model.
`ukgpu image export --oci DIR`: that image as OCI images for KubeVirt (kernel/image/export.py).
`ukgpu image snapshot DIR`: boot it once and save the running guest, so `ukgpu boot` restores it
(kernel/image/snapshot.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ukgpu.kernel.guest.arena import parse_size
from ukgpu.kernel.image import build as image
from ukgpu.tools.commands.boot import add_machine_options, machine_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("image", help="build the unikernel image for a model")
    verbs = parser.add_subparsers(dest="image_command", metavar="ACTION")
    verbs.required = True
    build = verbs.add_parser("build", help="build (or reuse from the cache) an image",
                             description="Build vmlinux + initramfs.cpio (stage 1) + root.img (erofs + "
                             "dm-verity tree) + manifest for MODEL. Same inputs give the same bytes; "
                             "builds are cached by input hash.")
    build.add_argument("-m", "--model", default=image.DEFAULT_MODEL,
                       help=f"known model name or .gguf path (default {image.DEFAULT_MODEL})")
    build.add_argument("-o", "--out", type=Path, help="also put the image files in this folder")
    build.add_argument("--kernel", type=Path,
                       help="kernel to boot (bzImage/vmlinuz or vmlinux; default: Debian's 6.1)")
    build.add_argument("--embed-limit", default="200M",
                       help="models up to this size go on the root disk, larger ones on their own "
                       "verity disk, model.img (default 200M)")
    build.add_argument("--no-numba", dest="numba", action="store_false",
                       help="leave numba/llvmlite out (-210 MiB; the CPU backend must not need them)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build)
    export = verbs.add_parser("export", help="write an image as OCI images (KubeVirt kernelBoot)",
                              description="Write the boot files, the root disk (and a model disk) as OCI images into "
                              "an OCI layout folder, with the kernel arguments the guest needs "
                              "(DIR/kernel-args.json). No container daemon is used.")
    export.add_argument("--oci", type=Path, required=True, metavar="DIR", help="OCI layout folder to write")
    source = export.add_mutually_exclusive_group()
    source.add_argument("-m", "--model", default=None,
                        help=f"build (or reuse) the image for this model (default {image.DEFAULT_MODEL})")
    source.add_argument("image_dir", nargs="?", type=Path, default=None,
                        help="an image folder (from `ukgpu image build -o DIR`) instead of -m")
    export.add_argument("--gzip", action="store_true", help="gzip the layers (smaller, slower to write)")
    export.add_argument("--append", action="append", default=[], metavar="WORD",
                        help="extra kernel argument, e.g. ukgpu.slots=4 (repeatable)")
    export.set_defaults(func=_export)
    snap = verbs.add_parser("snapshot", help="boot an image once and save it serving, for fast boots",
                            description="Boot DIR cold (verified against this host's record), run one "
                            "completion, save the guest's state and record its digest on this host. "
                            "`ukgpu boot DIR` with the same machine options then restores it: READY in "
                            "seconds, every byte checked against the record first.")
    snap.add_argument("dir", type=Path, help="image folder (from `ukgpu image build -o DIR`)")
    snap.add_argument("--drop", action="store_true",
                      help="remove the snapshot for these options instead of taking one")
    add_machine_options(snap)
    snap.set_defaults(func=_snapshot)


def _build(args: argparse.Namespace) -> int:
    config = image.BuildConfig(model=args.model, out=args.out, kernel=args.kernel,
                               embed_limit=parse_size(args.embed_limit), numba=args.numba,
                               force=args.force)
    built = image.build(config, log=lambda msg: print(msg, file=sys.stderr))
    print(built.dir)
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    from ukgpu.kernel.image import snapshot

    built = image.load(args.dir)
    opts = machine_options(args)  # no API key: never saved, each restore brings its own
    if args.drop:
        print("snapshot removed" if snapshot.drop(built, opts) else "no snapshot for these options",
              file=sys.stderr)
        return 0
    saved = snapshot.take(built, opts, log=lambda msg: print(msg, file=sys.stderr))
    print(saved.state)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ukgpu.kernel.image import export

    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.image_dir is not None:
        built = image.load(args.image_dir)
    else:
        built = image.build(image.BuildConfig(model=args.model or image.DEFAULT_MODEL), log=say)
    done = export.export_oci(built, args.oci, compress=args.gzip, extra_args=list(args.append), log=say)
    print(json.dumps(done.args, sort_keys=True, indent=1))
    return 0
