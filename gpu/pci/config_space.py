"""PCI configuration space parsing: type-0 header, BAR types, capabilities, extended capabilities.

Works on the bytes of a sysfs `config` file (or a VFIO config region).  Only
reads: BAR *sizes* come from sysfs `resource` (see `pci.py`), never from writing
all-ones into a live device's BARs.  Pure stdlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CAP_NAMES = {0x01: "PM", 0x02: "AGP", 0x03: "VPD", 0x04: "SlotID", 0x05: "MSI", 0x07: "PCI-X",
             0x09: "Vendor", 0x0A: "Debug", 0x0C: "SHPC", 0x0D: "SSVID", 0x10: "PCIe", 0x11: "MSI-X",
             0x12: "SATA", 0x13: "AF", 0x14: "EA"}
EXT_CAP_NAMES = {0x0001: "AER", 0x0002: "VC", 0x0003: "DSN", 0x0004: "PowerBudget", 0x000B: "Vendor",
                 0x000D: "ACS", 0x000E: "ARI", 0x000F: "ATS", 0x0010: "SR-IOV", 0x0013: "PRI",
                 0x0015: "ResizableBAR", 0x0018: "LTR", 0x0019: "SecondaryPCIe", 0x001B: "PASID",
                 0x001E: "L1SS", 0x0023: "DVSEC", 0x0024: "VFResizableBAR", 0x0025: "DLF",
                 0x0026: "PL16GT", 0x0027: "LaneMargining", 0x002A: "PL32GT"}
# Link speed encodings of Link Capabilities / Link Status, in GT/s.
LINK_SPEEDS = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}

CAP_ID_PM, CAP_ID_MSI, CAP_ID_PCIE, CAP_ID_MSIX = 0x01, 0x05, 0x10, 0x11
EXT_CAP_ID_REBAR = 0x0015
STATUS_CAP_LIST = 0x10
COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER = 0x1, 0x2, 0x4


class ConfigError(ValueError):
    pass


def _u8(data: bytes, off: int) -> int:
    return data[off]


def _u16(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 2], "little")


def _u32(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 4], "little")


@dataclass(frozen=True)
class Capability:
    id: int
    offset: int
    name: str
    extended: bool = False


@dataclass(frozen=True)
class PcieLink:
    max_speed_gts: float | None
    max_width: int
    speed_gts: float | None
    width: int

    def __str__(self) -> str:
        def fmt(speed, width):
            return f"{speed:g} GT/s x{width}" if speed else f"x{width}"
        return f"{fmt(self.speed_gts, self.width)} (max {fmt(self.max_speed_gts, self.max_width)})"


@dataclass(frozen=True)
class MsiInfo:
    enabled: bool
    vectors: int  # multiple message capable: 1, 2, 4, ... 32
    is_64bit: bool


@dataclass(frozen=True)
class MsixInfo:
    enabled: bool
    table_size: int
    table_bar: int
    table_offset: int


@dataclass(frozen=True)
class ResizableBar:
    bar: int
    current_size: int  # bytes
    supported_sizes: tuple[int, ...]  # bytes, ascending


@dataclass(frozen=True)
class BarRegister:
    """What the BAR register itself says (type bits); the size comes from sysfs."""

    index: int
    is_io: bool
    is_64bit: bool
    prefetchable: bool
    address: int


@dataclass
class ConfigSpace:
    vendor_id: int
    device_id: int
    command: int
    status: int
    revision: int
    class_code: int  # 24 bits: base class, subclass, prog-if
    header_type: int
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    bar_registers: list[BarRegister] = field(default_factory=list)
    capabilities: list[Capability] = field(default_factory=list)
    ext_capabilities: list[Capability] = field(default_factory=list)
    link: PcieLink | None = None
    msi: MsiInfo | None = None
    msix: MsixInfo | None = None
    resizable_bars: list[ResizableBar] = field(default_factory=list)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & COMMAND_MASTER)

    def has_cap(self, name: str) -> bool:
        return any(c.name == name for c in self.capabilities + self.ext_capabilities)


def parse_config(data: bytes) -> ConfigSpace:
    """Parse a config space dump (64 bytes at least; 256 for capabilities, 4096 for extended ones)."""
    if len(data) < 64:
        raise ConfigError(f"config space is {len(data)} bytes; at least 64 are needed")
    header_type = _u8(data, 0x0E) & 0x7F
    cfg = ConfigSpace(
        vendor_id=_u16(data, 0x00), device_id=_u16(data, 0x02), command=_u16(data, 0x04),
        status=_u16(data, 0x06), revision=_u8(data, 0x08), class_code=_u32(data, 0x08) >> 8,
        header_type=header_type)
    if cfg.vendor_id in (0xFFFF, 0x0000):
        raise ConfigError(f"vendor id {cfg.vendor_id:#06x}: no device answers at this address")
    if header_type == 0:
        cfg.subsystem_vendor_id, cfg.subsystem_id = _u16(data, 0x2C), _u16(data, 0x2E)
        cfg.bar_registers = parse_bar_registers(data, 6)
    elif header_type == 1:
        cfg.bar_registers = parse_bar_registers(data, 2)
    if cfg.status & STATUS_CAP_LIST and len(data) > 64:
        cfg.capabilities = _walk_caps(data)
        _decode_caps(data, cfg)
    if len(data) > 0x100:
        cfg.ext_capabilities = _walk_ext_caps(data)
        cfg.resizable_bars = [bar for c in cfg.ext_capabilities if c.id == EXT_CAP_ID_REBAR
                              for bar in _parse_rebar(data, c.offset)]
    return cfg


def parse_bar_registers(data: bytes, count: int) -> list[BarRegister]:
    bars, i = [], 0
    while i < count:
        raw = _u32(data, 0x10 + 4 * i)
        if raw & 0x1:
            bars.append(BarRegister(i, True, False, False, raw & ~0x3))
            i += 1
            continue
        is_64 = (raw >> 1) & 0x3 == 0x2
        address = raw & ~0xF
        if is_64 and i + 1 < count:
            address |= _u32(data, 0x10 + 4 * (i + 1)) << 32
        bars.append(BarRegister(i, False, is_64, bool(raw & 0x8), address))
        i += 2 if is_64 else 1
    return bars


def _walk_caps(data: bytes) -> list[Capability]:
    caps, seen = [], set()
    ptr = _u8(data, 0x34) & 0xFC
    while ptr >= 0x40 and ptr + 1 < len(data) and ptr not in seen:
        seen.add(ptr)
        cap_id = _u8(data, ptr)
        caps.append(Capability(cap_id, ptr, CAP_NAMES.get(cap_id, f"cap{cap_id:#04x}")))
        ptr = _u8(data, ptr + 1) & 0xFC
    return caps


def _walk_ext_caps(data: bytes) -> list[Capability]:
    caps, seen, ptr = [], set(), 0x100
    while ptr >= 0x100 and ptr + 4 <= len(data) and ptr not in seen:
        seen.add(ptr)
        header = _u32(data, ptr)
        if header in (0, 0xFFFFFFFF):
            break
        cap_id = header & 0xFFFF
        caps.append(Capability(cap_id, ptr, EXT_CAP_NAMES.get(cap_id, f"ext{cap_id:#06x}"), True))
        ptr = (header >> 20) & 0xFFC
    return caps


def _decode_caps(data: bytes, cfg: ConfigSpace) -> None:
    for cap in cfg.capabilities:
        off = cap.offset
        if cap.id == CAP_ID_PCIE and off + 0x14 <= len(data):
            lnkcap, lnksta = _u32(data, off + 0x0C), _u16(data, off + 0x12)
            cfg.link = PcieLink(LINK_SPEEDS.get(lnkcap & 0xF), (lnkcap >> 4) & 0x3F,
                                LINK_SPEEDS.get(lnksta & 0xF), (lnksta >> 4) & 0x3F)
        elif cap.id == CAP_ID_MSI:
            ctrl = _u16(data, off + 2)
            cfg.msi = MsiInfo(bool(ctrl & 0x1), 1 << ((ctrl >> 1) & 0x7), bool(ctrl & 0x80))
        elif cap.id == CAP_ID_MSIX:
            ctrl, table = _u16(data, off + 2), _u32(data, off + 4)
            cfg.msix = MsixInfo(bool(ctrl & 0x8000), (ctrl & 0x7FF) + 1, table & 0x7, table & ~0x7)


def _parse_rebar(data: bytes, off: int) -> list[ResizableBar]:
    """Resizable BAR extended capability: one (capability, control) register pair per BAR."""
    first_ctrl = _u32(data, off + 8)
    count = max(1, (first_ctrl >> 5) & 0x7)
    bars = []
    for n in range(count):
        cap, ctrl = _u32(data, off + 4 + 8 * n), _u32(data, off + 8 + 8 * n)
        # capability bits 4..31 -> 1 MiB << (bit - 4); control bits 16..31 -> 256 TiB << (bit - 16)
        sizes = [1 << (20 + bit - 4) for bit in range(4, 32) if cap >> bit & 1]
        sizes += [1 << (48 + bit - 16) for bit in range(16, 32) if ctrl >> bit & 1]
        bars.append(ResizableBar(ctrl & 0x7, 1 << (20 + ((ctrl >> 8) & 0x3F)), tuple(sorted(sizes))))
    return bars
