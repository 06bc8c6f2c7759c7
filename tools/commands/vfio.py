"""`ukgpu vfio check|bind|unbind|qemu-args|probe BDF`: prepare and inspect a device for VFIO passthrough.

bind/unbind print the sysfs writes they would make and act only with --yes.
"""

from __future__ import annotations

import argparse
import json

from ukgpu.gpu.pci.sysfs import human_size, normalize_bdf
from ukgpu.gpu.vfio.device import describe, open_device
from ukgpu.gpu.vfio.host import Plan, VfioHost
from ukgpu.gpu.vfio.passthrough import qemu_vfio_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("vfio", help="check, bind or unbind a PCI device for VFIO passthrough")
    verbs = parser.add_subparsers(dest="vfio_command", metavar="ACTION")
    verbs.required = True
    for name, helptext, func in (
            ("check", "IOMMU, group members and drivers, BARs, the MMIO window QEMU needs", _check),
            ("bind", "bind the device to vfio-pci (dry run unless --yes)", _bind),
            ("unbind", "give the device back to its host driver (dry run unless --yes)", _unbind),
            ("qemu-args", "QEMU arguments that pass the device through (q35)", _qemu_args),
            ("probe", "open a vfio-pci device: its regions, IRQs and first BAR0 register", _probe)):
        verb = verbs.add_parser(name, help=helptext)
        verb.add_argument("bdf", type=normalize_bdf, help="PCI address, e.g. 0000:01:00.0")
        if name in ("bind", "unbind"):
            verb.add_argument("--yes", action="store_true", help="perform the writes (default: print them)")
        if name == "probe":
            verb.add_argument("--json", action="store_true", help="machine-readable output")
        verb.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
        verb.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
        verb.add_argument("--dev", default="/dev/vfio", help=argparse.SUPPRESS)
        verb.set_defaults(func=func)


def _host(args: argparse.Namespace) -> VfioHost:
    return VfioHost(args.sysfs, args.proc)


def _check(args: argparse.Namespace) -> int:
    report = _host(args).check(args.bdf)
    print("\n".join(report.lines()))
    return 1 if report.problems else 0


def _run_plan(plan: Plan, yes: bool, verb: str) -> int:
    for note in plan.notes:
        print(f"note: {note}")
    if plan.others:
        print(f"the IOMMU group also holds {', '.join(plan.others)}: {verb} them too before using VFIO")
    for write in plan.writes:
        print(("writing: " if yes else "would write: ") + str(write))
    if not yes:
        if plan.writes:
            print("dry run: nothing changed; add --yes to perform these writes")
        return 0
    plan.apply()
    return 0


def _bind(args: argparse.Namespace) -> int:
    return _run_plan(_host(args).plan_bind(args.bdf), args.yes, "bind")


def _unbind(args: argparse.Namespace) -> int:
    return _run_plan(_host(args).plan_unbind(args.bdf), args.yes, "unbind")


def _qemu_args(args: argparse.Namespace) -> int:
    print(" ".join(qemu_vfio_args(args.bdf, args.sysfs)))
    return 0


def _probe(args: argparse.Namespace) -> int:
    with open_device(args.bdf, sysfs_root=args.sysfs, dev_root=args.dev) as session:
        info = describe(session)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['bdf']}  {info['vendor_id']:04x}:{info['device_id']:04x}  VFIO API {info['api_version']}  "
          f"reset {'yes' if info['reset'] else 'no'}")
    for region in info["regions"]:
        size = "-" if region["size"] is None else human_size(region["size"]) if region["size"] else "0"
        print(f"  region {region['index']} {region['name']:<6} {size:>10}  {region['flags'] or '-'}")
    print("  IRQs " + "  ".join(f"{name} {'-' if n is None else n}" for name, n in info["irqs"].items()))
    if "bar0_reg0" in info:
        print(f"  BAR0[0x0] = {info['bar0_reg0']:#010x}")
    return 0
