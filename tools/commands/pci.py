"""`ukgpu pci`: PCI devices (NVIDIA GPUs first) with BARs, link, driver and IOMMU group."""

from __future__ import annotations

import argparse
import json

from ukgpu.gpu.pci.sysfs import PciBus, PciDevice


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pci", help="list PCI devices (NVIDIA GPUs first): BARs, link, binding")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--gpus", action="store_true", help="only NVIDIA GPUs")
    parser.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    parser.set_defaults(func=_pci)


def _pci(args: argparse.Namespace) -> int:
    bus = PciBus(args.sysfs)
    devices = bus.nvidia_gpus() if args.gpus else bus.devices()
    if args.json:
        print(json.dumps([d.to_json() for d in devices], indent=2))
        return 0
    if not devices:
        print("no NVIDIA GPU found" if args.gpus else "no PCI devices")
    for dev in devices:
        print("\n".join(describe(dev)))
    return 0


def describe(dev: PciDevice) -> list[str]:
    tag = "  [NVIDIA GPU]" if dev.is_nvidia_gpu else ""
    lines = [f"{dev.bdf}  {dev.vendor_id:04x}:{dev.device_id:04x}  class {dev.class_code:06x}  "
             f"{dev.vendor_name} {dev.device_name}{tag}"]
    group = dev.iommu_group if dev.iommu_group is not None else "-"
    numa = dev.numa_node if dev.numa_node is not None else "-"
    lines.append(f"    driver {dev.driver or '(none)'}  IOMMU group {group}  NUMA {numa}")
    lines += [f"    {bar.describe()}" for bar in dev.bars]
    cfg = dev.config
    if cfg is not None:
        if cfg.link:
            lines.append(f"    PCIe link {cfg.link}")
        caps = [c.name for c in cfg.capabilities + cfg.ext_capabilities]
        if caps:
            lines.append(f"    caps {' '.join(caps)}")
        for rebar in cfg.resizable_bars:
            lines.append(f"    resizable BAR{rebar.bar}: now {rebar.current_size >> 20} MiB, "
                         f"up to {max(rebar.supported_sizes, default=0) >> 20} MiB")
    lines += [f"    note: {n}" for n in dev.notes]
    return lines
