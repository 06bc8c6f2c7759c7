"""Recorded PCI sysfs facts <-> a real, writable sysfs tree for tests.

A recorded machine is a folder `<name>/devices/<bdf with _ for :>/` holding copies of the
sysfs attribute files (`config`, `resource`, `vendor`, `device`, `class`, ...)
and a small text file `links` for the symlinks, one `name target` per line
(`driver vfio-pci`, `iommu_group 12`), plus optional `drm`, `net` and `block` lines naming the class devices
the host made from it (`net eth0`).
`materialize(name, dest)` rebuilds `<dest>/bus/pci/devices`, `drivers/<drv>`,
`drivers_probe` and `kernel/iommu_groups` with real symlinks, so code under
test reads it exactly like /sys.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATTRS = ("config", "resource", "vendor", "device", "class", "revision", "subsystem_vendor",
         "subsystem_device", "numa_node", "boot_vga")


def read_links(folder: Path) -> dict[str, str]:
    path = folder / "links"
    if not path.is_file():
        return {}
    return dict(line.split(None, 1) for line in path.read_text().splitlines() if line.strip())


def materialize(name: str, dest: Path) -> Path:
    """Build (or add to) a sysfs tree for recorded machine `name` under `dest`; returns `dest`."""
    pci = dest / "bus/pci"
    (pci / "devices").mkdir(parents=True, exist_ok=True)
    (pci / "drivers").mkdir(exist_ok=True)
    (pci / "drivers_probe").touch()
    (dest / "kernel/iommu_groups").mkdir(parents=True, exist_ok=True)
    for src in sorted((HERE / name / "devices").iterdir()):
        bdf = src.name.replace("_", ":")
        dev = pci / "devices" / bdf
        dev.mkdir()
        for attr in ATTRS:
            if (src / attr).is_file():
                shutil.copyfile(src / attr, dev / attr)
        (dev / "driver_override").write_text("(null)\n")
        links = read_links(src)
        for kind in ("drm", "net", "block"):
            for child in links.get(kind, "").split():
                (dev / kind / child).mkdir(parents=True)
        if "driver" in links:
            add_driver(dest, links["driver"])
            os.symlink(f"../../drivers/{links['driver']}", dev / "driver")
        if "iommu_group" in links:
            group = dest / "kernel/iommu_groups" / links["iommu_group"] / "devices"
            group.mkdir(parents=True, exist_ok=True)
            os.symlink(f"../../../kernel/iommu_groups/{links['iommu_group']}", dev / "iommu_group")
            os.symlink(f"../../../../bus/pci/devices/{bdf}", group / bdf)
    return dest


def add_driver(dest: Path, driver: str) -> Path:
    folder = dest / "bus/pci/drivers" / driver
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("bind", "unbind", "new_id"):
        (folder / f).touch()
    return folder


def set_driver(dest: Path, bdf: str, driver: str | None) -> None:
    """Re-point a device's `driver` link (None: unbound), as if the kernel had bound it."""
    link = dest / "bus/pci/devices" / bdf / "driver"
    if link.is_symlink():
        link.unlink()
    if driver:
        add_driver(dest, driver)
        os.symlink(f"../../drivers/{driver}", link)


def open_fd(proc: Path, pid: int, fd: int, target: str) -> None:
    """Make `<proc>/<pid>/fd/<fd>` point at `target`, like a process holding a file open."""
    folder = proc / str(pid) / "fd"
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(target, folder / str(fd))
