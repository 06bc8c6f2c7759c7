"""`ukgpu boot DIR`: run an image in QEMU, stream its console, serve until Ctrl-C or poweroff."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from ukgpu.kernel.image import build as image
from ukgpu.kernel.image import qemu


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("boot", help="boot an image in QEMU and serve its API",
                                   description="Boot an image built by `ukgpu image build`. "
                                   "Ctrl-C or SIGTERM powers the guest off (killed after --stop-timeout).")
    parser.add_argument("dir", help="image folder (from `ukgpu image build -o DIR`)")
    parser.add_argument("--pin", metavar="DIGEST",
                        help="an image built on another host: check the folder against the digest its "
                        "`ukgpu image build` printed, record it as trusted on this host, then boot")
    parser.add_argument("--cold", action="store_true",
                        help="boot from scratch even when `ukgpu image snapshot` saved this image "
                        "with these options (a restore reaches READY in seconds)")
    add_vm_options(parser)
    parser.set_defaults(func=_boot)


def add_vm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080,
                        help="host port (127.0.0.1) forwarded to the guest API (0: any free one)")
    add_machine_options(parser)
    parser.add_argument("--gpu", metavar="BDF",
                        help="pass this host PCI device (bound to vfio-pci) to the guest")
    parser.add_argument("--api-key-file", metavar="PATH",
                        help="the guest API then needs 'Authorization: Bearer KEY' with the key "
                        "on this file's first line (default: $UKGPU_API_KEY; none: no key). A cold "
                        "boot passes the key on the guest's kernel command line, which host users "
                        "can see in QEMU's arguments; a restored snapshot gets it over the console")
    parser.add_argument("--insecure-skip-verify", dest="verify", action="store_false",
                        help="boot files this host has no record of, without the guest's image check "
                        "(its /health then says image_verified: false); for debugging images only")
    parser.add_argument("--boot-timeout", type=float, default=600.0,
                        help="seconds to wait for READY (default 600)")
    parser.add_argument("--stop-timeout", type=float, default=30.0,
                        help="seconds to wait for a clean poweroff before killing QEMU")


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """What the guest machine is made of (a snapshot is kept per combination of these)."""
    parser.add_argument("--mem", help="guest RAM, QEMU syntax (default: sized from the image)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                        help="tcg: emulation, works anywhere (default); kvm: hardware "
                        "virtualization on a real host")
    parser.add_argument("--arena", help="guest host-memory arena, e.g. 2G (default: sized "
                        "from the model)")
    parser.add_argument("--append", action="append", default=[], metavar="WORD",
                        help="extra kernel command line word, e.g. ukgpu.ctx=4096 (repeatable)")


def machine_options(args: argparse.Namespace) -> qemu.BootOptions:
    """The options of `add_machine_options` alone (a snapshot's machine): any free port, no GPU,
    no API key, the image checked."""
    return qemu.BootOptions(port=0, mem=args.mem, cpus=args.cpus, accel=args.accel, arena=args.arena,
                            append=list(args.append))


def vm_options(args: argparse.Namespace) -> qemu.BootOptions:
    """The options of `add_vm_options`: the machine, and the port, GPU, API key and image check."""
    from ukgpu.kernel.api import security

    try:
        key = security.resolve_key(None, args.api_key_file, os.environ)
    except ValueError as exc:
        raise SystemExit(f"ukgpu: error: {exc}") from None
    return dataclasses.replace(machine_options(args), port=args.port, gpu=args.gpu, api_key=key,
                               verify=args.verify)


def _echo(line: str) -> None:
    print(line, flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _boot(args: argparse.Namespace) -> int:
    from ukgpu.kernel.image import snapshot, trust

    img = image.load(args.dir)
    if args.pin:
        trust.pin_folder(img.dir, img.info, args.pin)
    opts = vm_options(args)
    saved = None if args.cold else snapshot.find(img, opts)
    if saved is not None:
        print(f"ukgpu: restoring the snapshot {saved.state} (--cold boots from scratch)",
              file=sys.stderr, flush=True)
    vm = qemu.Vm(img, opts, on_line=_echo, restore=saved)
    # QEMU runs in its own session, so only we see Ctrl-C / SIGTERM: turn both into a poweroff
    # (also when started in the background, where SIGINT arrives ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    vm.start()
    try:
        vm.wait_ready(args.boot_timeout)
        print(f"ukgpu: serving {vm.url} (OpenAI API under /v1; Ctrl-C powers the guest off)",
              file=sys.stderr, flush=True)
        code = vm.wait()
    except KeyboardInterrupt:
        print("ukgpu: powering the guest off", file=sys.stderr, flush=True)
        code = vm.poweroff(args.stop_timeout)
    finally:
        vm.kill()
    if vm.fatal:
        print(f"ukgpu: error: the guest failed: {vm.fatal}", file=sys.stderr)
        return 1
    return code
