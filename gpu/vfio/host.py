"""Host preparation for VFIO passthrough: check a device, bind it to vfio-pci, give it back.

Binding goes through `driver_override` + the current driver's `unbind` +
`drivers_probe`, touching only the named device.  Every action is a list of
`SysfsWrite`s: printed in a dry run, performed only when asked.  A device that
looks in use (open /dev/nvidia*, DRM card nodes or VFIO group files, the boot
VGA, a bridge) is refused with the reason.  Sysfs and procfs roots are injectable;
every sysfs fact comes from `gpu.pci.sysfs.PciBus`.  Pure stdlib.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ukgpu.gpu.pci.sysfs import PciBus, PciDevice, PciIds, human_size, normalize_bdf
from ukgpu.gpu.vfio.iommu import VFIO_DRIVER, VfioError
from ukgpu.gpu.vfio.passthrough import mmio_window_size

# Base classes whose devices, while bound, carry the host's own disks, network or buses.
_HOST_CLASSES = {0x01: "a storage controller", 0x02: "a network controller", 0x0C: "a serial bus controller"}


@dataclass(frozen=True)
class SysfsWrite:
    path: Path
    value: str

    def __str__(self) -> str:
        return f"echo {self.value.strip() or chr(39) * 2} > {self.path}"

    def apply(self) -> None:
        try:
            with open(self.path, "w") as f:
                f.write(self.value)
        except OSError as exc:
            raise VfioError(f"writing {self.value!r} to {self.path} failed: {exc.strerror} "
                            f"(are you root?)") from exc


@dataclass
class Plan:
    bdf: str
    writes: list[SysfsWrite] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # group members that must follow, with drivers
    notes: list[str] = field(default_factory=list)

    def apply(self) -> None:
        for write in self.writes:
            write.apply()


@dataclass
class CheckReport:
    device: PciDevice
    iommu_enabled: bool
    group_members: dict[str, str | None]
    vfio_loaded: bool
    mmio_window: int
    problems: list[str]

    def lines(self) -> list[str]:
        d = self.device
        out = [f"{d.bdf} {d.vendor_id:04x}:{d.device_id:04x} class {d.class_code:06x} "
               f"{d.vendor_name} {d.device_name}".rstrip(),
               f"  driver: {d.driver or '(none)'}   NUMA node: {'-' if d.numa_node is None else d.numa_node}",
               f"  IOMMU: {'on' if self.iommu_enabled else 'OFF'}   "
               f"group: {'-' if d.iommu_group is None else d.iommu_group}"]
        for bdf, drv in self.group_members.items():
            out.append(f"    member {bdf}: {drv or '(no driver)'}")
        out += [f"  {bar.describe()}" for bar in d.bars]
        out.append(f"  QEMU 64-bit MMIO window needed: {human_size(self.mmio_window)} "
                   f"(-global q35-pcihost.pci-hole64-size={self.mmio_window})")
        out.append(f"  vfio-pci driver: {'loaded' if self.vfio_loaded else 'not loaded (modprobe vfio-pci)'}")
        if self.problems:
            return out + [f"  PROBLEM: {p}" for p in self.problems]
        ready = d.driver == VFIO_DRIVER
        return out + ["  ready for VFIO" if ready else f"  can be bound: ukgpu vfio bind {d.bdf}"]


class VfioHost:
    """Checks and bind/unbind plans for the PCI devices under `sysfs_root` (processes from `proc_root`)."""

    def __init__(self, sysfs_root: str | os.PathLike = "/sys", proc_root: str | os.PathLike = "/proc",
                 ids: PciIds | None = None):
        self.proc = Path(proc_root)
        self.bus = PciBus(sysfs_root, ids)

    def group_members(self, group: int | None) -> dict[str, str | None]:
        return {} if group is None else self.bus.group_members(group)

    def iommu_enabled(self) -> bool:
        return self.bus.iommu_enabled()

    def check(self, bdf: str) -> CheckReport:
        dev = self.bus.device(bdf)
        members = self.group_members(dev.iommu_group)
        problems = []
        if not self.iommu_enabled():
            problems.append("no IOMMU groups: enable VT-d/AMD-Vi and boot with intel_iommu=on or amd_iommu=on")
        problems += self.in_use_reasons(dev)
        problems += [f"group member {m} is bound to {drv}: it must be bound to vfio-pci too"
                     for m, drv in members.items() if m != dev.bdf and drv not in (None, VFIO_DRIVER)
                     and not self._is_bridge(m)]
        vfio = self.bus.driver_loaded(VFIO_DRIVER)
        return CheckReport(dev, self.iommu_enabled(), members, vfio, mmio_window_size(dev.bars), problems)

    def _is_bridge(self, bdf: str) -> bool:
        return self.bus.device(bdf).class_code >> 8 == 0x0604

    def in_use_reasons(self, dev: PciDevice) -> list[str]:
        """Why taking this device from its driver now would hurt something (empty: safe)."""
        reasons = []
        if dev.class_code >> 8 == 0x0604:
            reasons.append(f"{dev.bdf} is a PCI bridge: pass through the devices behind it instead")
        if dev.driver and dev.driver != VFIO_DRIVER:
            serving = self._host_interfaces(dev.bdf) or _HOST_CLASSES.get(dev.class_code >> 16)
            if serving:
                reasons.append(f"{dev.bdf} ({dev.driver}) serves the host: {serving}")
        if self.bus.is_boot_vga(dev.bdf):
            reasons.append(f"{dev.bdf} is the boot VGA device (the host console uses it)")
        nodes = self._device_nodes(dev)
        holders, hidden = self._open_by(nodes)
        for node, pids in sorted(holders.items()):
            reasons.append(f"{node} is open by pid {', '.join(map(str, pids))}: stop those processes first")
        if hidden:
            reasons.append(f"cannot see the open files of {hidden} processes, so cannot tell whether "
                           f"{', '.join(sorted(nodes))} are in use: run as root")
        return reasons

    def _host_interfaces(self, bdf: str) -> str:
        """Network interfaces or block devices the host made from this device ('' if none)."""
        return ", ".join(f"{kind} {name}" for kind in ("net", "block")
                         for name in self.bus.class_devices(bdf, kind))

    def _device_nodes(self, dev: PciDevice) -> set[str]:
        """Device files that belong to this PCI device (or, for nvidia, to every NVIDIA GPU)."""
        nodes = {f"/dev/dri/{name}" for name in self.bus.class_devices(dev.bdf, "drm", nested=False)}
        if dev.driver == "nvidia":
            nodes.add("/dev/nvidia*")  # nvidia's nodes are not per device in sysfs: be conservative
        if dev.driver == VFIO_DRIVER and dev.iommu_group is not None:
            nodes.add(f"/dev/vfio/{dev.iommu_group}")
        return nodes

    def _open_by(self, nodes: set[str]) -> tuple[dict[str, list[int]], int]:
        """{open file: [pids]} for files matching `nodes`, and how many processes could not be seen."""
        found: dict[str, list[int]] = {}
        hidden = 0
        if not nodes or not self.proc.is_dir():
            return found, hidden
        for pid_dir in self.proc.iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                targets = [os.readlink(fd) for fd in (pid_dir / "fd").iterdir()]
            except PermissionError:
                hidden += 1
                continue
            except OSError:
                continue  # the process ended meanwhile
            for target in targets:
                for node in nodes:
                    if target == node or (node.endswith("*") and target.startswith(node[:-1])):
                        found.setdefault(target, []).append(int(pid_dir.name))
        return found, hidden

    def plan_bind(self, bdf: str) -> Plan:
        dev = self.bus.device(normalize_bdf(bdf))
        plan = Plan(dev.bdf)
        if dev.driver == VFIO_DRIVER:
            plan.notes.append(f"{dev.bdf} is already bound to {VFIO_DRIVER}: nothing to do")
            return plan
        if dev.iommu_group is None:
            raise VfioError(f"{dev.bdf} has no IOMMU group, so vfio-pci could not use it: enable the IOMMU "
                            f"(intel_iommu=on or amd_iommu=on) and reboot first")
        reasons = self.in_use_reasons(dev)
        if reasons:
            raise VfioError(f"refusing to unbind {dev.bdf} from {dev.driver}: " + "; ".join(reasons))
        if not self.bus.driver_loaded(VFIO_DRIVER):
            plan.notes.append("the vfio-pci driver is not loaded: run `modprobe vfio-pci` first")
        plan.writes.append(SysfsWrite(self.bus.device_dir(dev.bdf) / "driver_override", VFIO_DRIVER))
        if dev.driver:
            plan.writes.append(self._unbind(dev))
        plan.writes.append(self._probe(dev))
        plan.others = [f"{m} ({drv or 'no driver'})" for m, drv in self.group_members(dev.iommu_group).items()
                       if m != dev.bdf and drv != VFIO_DRIVER and not self._is_bridge(m)]
        return plan

    def plan_unbind(self, bdf: str) -> Plan:
        """Give a device back: unbind from its driver, clear the override, let the host driver probe."""
        dev = self.bus.device(normalize_bdf(bdf))
        plan = Plan(dev.bdf)
        reasons = self.in_use_reasons(dev)
        if reasons:
            raise VfioError(f"refusing to unbind {dev.bdf}: " + "; ".join(reasons))
        if dev.driver:
            plan.writes.append(self._unbind(dev))
        else:
            plan.notes.append(f"{dev.bdf} has no driver")
        plan.writes.append(SysfsWrite(self.bus.device_dir(dev.bdf) / "driver_override", "\n"))
        plan.writes.append(self._probe(dev))
        return plan

    def _unbind(self, dev: PciDevice) -> SysfsWrite:
        return SysfsWrite(self.bus.drivers_dir / dev.driver / "unbind", dev.bdf)

    def _probe(self, dev: PciDevice) -> SysfsWrite:
        return SysfsWrite(self.bus.bus_dir / "drivers_probe", dev.bdf)
