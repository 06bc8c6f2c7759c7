"""PCI devices from sysfs: identity, BARs with sizes, capabilities and link, binding facts.

`PciBus(root="/sys").devices()` reads `/sys/bus/pci/devices/*` (the root is
injectable, so tests run on recorded trees).  BAR sizes come from each device's
`resource` file; the config space is parsed by `config_space`.  Pure stdlib.

This is the one reader of PCI sysfs: the VFIO layer (`gpu.vfio.device`, which
also runs in minimal guests) and the host setup (`gpu.vfio.host`) ask `PciBus`
for drivers, IOMMU groups and the other binding facts instead of reading links
themselves.  Those single-fact readers take the device's sysfs name as is
(`0000:01:00.0`) and never touch the config space or pci.ids.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ukgpu.gpu.pci.config_space import ConfigError, ConfigSpace, parse_config
from ukgpu.llama_core.errors import UkgpuError

NVIDIA_VENDOR = 0x10DE
PCI_IDS_PATHS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids", "/usr/share/pci.ids")
# linux/ioport.h resource flags, as found in sysfs `resource`
IORESOURCE_IO, IORESOURCE_MEM = 0x100, 0x200
IORESOURCE_PREFETCH, IORESOURCE_MEM_64 = 0x2000, 0x100000
_BDF = re.compile(r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


class PciError(UkgpuError):
    """A PCI device or address cannot be found or read."""


def normalize_bdf(text: str) -> str:
    """'0:6.0', '00000000:00:06.0' or '0000:00:06.0' -> '0000:00:06.0' (lowercase hex)."""
    m = _BDF.match(text.strip())
    if not m:
        raise PciError(f"{text!r} is not a PCI address: use DOMAIN:BUS:DEVICE.FUNCTION, e.g. 0000:01:00.0")
    domain, bus, dev, fn = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"


def cuda_ordinal(bdf: str, cuda_bus_ids: list[str]) -> int | None:
    """The CUDA device ordinal whose PCI bus id (from the CUDA layer, in ordinal order) is `bdf`."""
    want = normalize_bdf(bdf)
    for ordinal, bus_id in enumerate(cuda_bus_ids):
        if normalize_bdf(bus_id) == want:
            return ordinal
    return None


@dataclass(frozen=True)
class Bar:
    index: int
    start: int
    size: int
    is_io: bool
    is_64bit: bool
    prefetchable: bool

    def describe(self) -> str:
        kind = "I/O" if self.is_io else ("64-bit" if self.is_64bit else "32-bit")
        pref = ", prefetchable" if self.prefetchable else ""
        return f"BAR{self.index} {human_size(self.size)} ({kind}{pref}) at {self.start:#x}"


def human_size(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def parse_resource(text: str) -> list[Bar]:
    """BARs 0-5 from a sysfs `resource` file (start end flags per line); unused ones omitted."""
    bars = []
    for index, line in enumerate(text.splitlines()[:6]):
        start, end, flags = (int(x, 16) for x in line.split())
        if end == 0 or not flags & (IORESOURCE_IO | IORESOURCE_MEM):
            continue
        bars.append(Bar(index, start, end - start + 1, bool(flags & IORESOURCE_IO),
                        bool(flags & IORESOURCE_MEM_64), bool(flags & IORESOURCE_PREFETCH)))
    return bars


class PciIds:
    """Vendor and device names from a pci.ids file, or hex ids when none is installed."""

    def __init__(self, path: str | os.PathLike | None = None, search: tuple[str, ...] = PCI_IDS_PATHS):
        """Load `path`, or else the first installed file of `search` (none: hex ids only)."""
        self.vendors: dict[int, str] = {}
        self.devices: dict[tuple[int, int], str] = {}
        path = path or next((p for p in search if os.path.isfile(p)), None)
        if path:
            self._load(Path(path))

    def _load(self, path: Path) -> None:
        vendor = None
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line or line.startswith("#"):
                continue
            if line.startswith("C "):
                break  # the device-class section follows the vendors
            if not line.startswith("\t"):
                vendor = int(line[:4], 16)
                self.vendors[vendor] = line[4:].strip()
            elif not line.startswith("\t\t") and vendor is not None:
                self.devices[(vendor, int(line[1:5], 16))] = line[5:].strip()

    def vendor(self, vendor_id: int) -> str:
        return self.vendors.get(vendor_id, f"{vendor_id:04x}")

    def device(self, vendor_id: int, device_id: int) -> str:
        return self.devices.get((vendor_id, device_id), f"{device_id:04x}")


@dataclass
class PciDevice:
    bdf: str
    vendor_id: int
    device_id: int
    class_code: int  # 24 bits
    revision: int
    subsystem_vendor_id: int
    subsystem_id: int
    bars: list[Bar]
    config: ConfigSpace | None  # None when the config file is unreadable
    driver: str | None
    iommu_group: int | None
    numa_node: int | None
    vendor_name: str = ""
    device_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def is_nvidia_gpu(self) -> bool:
        return self.vendor_id == NVIDIA_VENDOR and self.class_code >> 16 == 0x03

    @property
    def largest_bar(self) -> int:
        return max((b.size for b in self.bars if not b.is_io), default=0)

    def to_json(self) -> dict:
        cfg = self.config
        return {
            "bdf": self.bdf, "vendor_id": f"{self.vendor_id:04x}", "device_id": f"{self.device_id:04x}",
            "vendor": self.vendor_name, "device": self.device_name, "class": f"{self.class_code:06x}",
            "revision": self.revision,
            "subsystem": f"{self.subsystem_vendor_id:04x}:{self.subsystem_id:04x}",
            "driver": self.driver, "iommu_group": self.iommu_group, "numa_node": self.numa_node,
            "nvidia_gpu": self.is_nvidia_gpu,
            "bars": [{"index": b.index, "start": b.start, "size": b.size, "io": b.is_io,
                      "64bit": b.is_64bit, "prefetchable": b.prefetchable} for b in self.bars],
            "capabilities": [c.name for c in cfg.capabilities] if cfg else [],
            "ext_capabilities": [c.name for c in cfg.ext_capabilities] if cfg else [],
            "link": str(cfg.link) if cfg and cfg.link else None,
            "bus_master": cfg.bus_master if cfg else None,
            "resizable_bars": [{"bar": r.bar, "size": r.current_size} for r in cfg.resizable_bars] if cfg else [],
            "notes": self.notes,
        }


class PciBus:
    """PCI devices under `<root>/bus/pci/devices`, and the IOMMU groups under `<root>/kernel`."""

    def __init__(self, root: str | os.PathLike = "/sys", ids: PciIds | None = None):
        self.root = Path(root)
        self._ids = ids

    @property
    def ids(self) -> PciIds:
        """Vendor and device names: pci.ids is read on first use (binding facts need none)."""
        if self._ids is None:
            self._ids = PciIds()
        return self._ids

    @property
    def bus_dir(self) -> Path:
        return self.root / "bus/pci"

    @property
    def devices_dir(self) -> Path:
        return self.bus_dir / "devices"

    @property
    def drivers_dir(self) -> Path:
        return self.bus_dir / "drivers"

    @property
    def iommu_groups_dir(self) -> Path:
        return self.root / "kernel/iommu_groups"

    def addresses(self) -> list[str]:
        if not self.devices_dir.is_dir():
            raise PciError(f"{self.devices_dir} does not exist: is sysfs mounted?")
        return sorted(p.name for p in self.devices_dir.iterdir())

    def devices(self) -> list[PciDevice]:
        """All devices, NVIDIA GPUs first, then by address."""
        found = [self.device(bdf) for bdf in self.addresses()]
        return sorted(found, key=lambda d: (not d.is_nvidia_gpu, d.bdf))

    def nvidia_gpus(self) -> list[PciDevice]:
        return [d for d in self.devices() if d.is_nvidia_gpu]

    def device(self, bdf: str) -> PciDevice:
        bdf = normalize_bdf(bdf)
        folder = self.device_dir(bdf)
        if not folder.is_dir():
            raise PciError(f"no PCI device {bdf} under {self.devices_dir}: list them with `ukgpu pci`")
        notes: list[str] = []
        config = _read_config(folder, notes)
        vendor = _hex_attr(folder, "vendor", config.vendor_id if config else 0)
        device = _hex_attr(folder, "device", config.device_id if config else 0)
        bars = _read_bars(folder, notes)
        return PciDevice(
            bdf=bdf, vendor_id=vendor, device_id=device,
            class_code=_hex_attr(folder, "class", config.class_code if config else 0),
            revision=_hex_attr(folder, "revision", config.revision if config else 0),
            subsystem_vendor_id=_hex_attr(folder, "subsystem_vendor", config.subsystem_vendor_id if config else 0),
            subsystem_id=_hex_attr(folder, "subsystem_device", config.subsystem_id if config else 0),
            bars=bars, config=config, driver=self.driver(bdf), iommu_group=self.iommu_group(bdf),
            numa_node=_numa(folder), vendor_name=self.ids.vendor(vendor),
            device_name=self.ids.device(vendor, device), notes=notes)

    # ------------------------------------------------------------ binding facts, one each

    def device_dir(self, bdf: str) -> Path:
        """The sysfs folder of the device named `bdf` (it may not exist)."""
        return self.devices_dir / bdf

    def driver(self, bdf: str) -> str | None:
        """The name of the driver bound to `bdf` (None: unbound, or no such device)."""
        return _link_name(self.device_dir(bdf) / "driver")

    def iommu_group(self, bdf: str) -> int | None:
        """The IOMMU group number of `bdf` (None: none, e.g. the IOMMU is off)."""
        return _int_or_none(_link_name(self.device_dir(bdf) / "iommu_group"))

    def iommu_enabled(self) -> bool:
        """Whether the kernel made any IOMMU group (none: the IOMMU is off or absent)."""
        groups = self.iommu_groups_dir
        return groups.is_dir() and any(groups.iterdir())

    def group_members(self, group: int) -> dict[str, str | None]:
        """{bdf: driver or None} for every device of IOMMU group `group` ({}: no such group)."""
        folder = self.iommu_groups_dir / str(group) / "devices"
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        return {name: self.driver(name) for name in names}

    def driver_loaded(self, name: str) -> bool:
        """Whether the PCI driver `name` is registered (its module is loaded or built in)."""
        return (self.drivers_dir / name).is_dir()

    def is_boot_vga(self, bdf: str) -> bool:
        """Whether firmware used `bdf` as the boot display (the host console is on it)."""
        flag = self.device_dir(bdf) / "boot_vga"
        return flag.is_file() and flag.read_text().strip() == "1"

    def class_devices(self, bdf: str, kind: str, nested: bool = True) -> list[str]:
        """Names of the `kind` class devices ("net", "block", "drm") the host made from `bdf`.

        `nested` also looks one level down (a virtio function's `virtio0/net/eth0`).
        """
        folder = self.device_dir(bdf)
        patterns = (kind, f"*/{kind}") if nested else (kind,)
        return [p.name for pattern in patterns for d in folder.glob(pattern) for p in sorted(d.iterdir())]


def _read_config(folder: Path, notes: list[str]) -> ConfigSpace | None:
    try:
        data = (folder / "config").read_bytes()
    except OSError as exc:
        notes.append(f"config unreadable: {exc.strerror}")
        return None
    if len(data) <= 64:
        notes.append("only 64 config bytes readable (run as root for capabilities)")
    try:
        return parse_config(data)
    except ConfigError as exc:
        notes.append(str(exc))
        return None


def _read_bars(folder: Path, notes: list[str]) -> list[Bar]:
    try:
        return parse_resource((folder / "resource").read_text())
    except OSError:
        notes.append("no sysfs resource file: BAR sizes unknown")
        return []


def _hex_attr(folder: Path, name: str, default: int) -> int:
    try:
        return int((folder / name).read_text().strip(), 16)
    except (OSError, ValueError):
        return default


def _link_name(path: Path) -> str | None:
    return os.path.basename(os.readlink(path)) if path.is_symlink() else None


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def _numa(folder: Path) -> int | None:
    try:
        node = int((folder / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None
