"""Construct the H100 sysfs trees from recorded facts (not dumped from the machine; see README).

    python tests/data/sysfs/make_h100.py

Facts: H100 80GB HBM3 at 0000:00:06.0, 10de:2330, class 0x0302, BAR0 16 MiB,
BAR2 128 GiB 64-bit prefetchable, BAR4 32 MiB.  `h100-host` is the host view
with the GPU bound to vfio-pci in its own IOMMU group; `h100-guest` is the view
inside the VM that receives it (nvidia driver, no IOMMU groups).
"""

from __future__ import annotations

import struct

from sysfs_tree import HERE

BDF = "0000_00_06.0"
GiB, MiB = 1 << 30, 1 << 20
IORESOURCE_MEM, IORESOURCE_PREFETCH, IORESOURCE_MEM_64 = 0x200, 0x2000, 0x100000
# (register index, size, prefetchable, address): every BAR is 64-bit (two registers),
# which is what the BAR0/BAR2/BAR4 numbering implies.
BARS = [(0, 16 * MiB, False, 0xC000000000), (2, 128 * GiB, True, 0xE000000000),
        (4, 32 * MiB, True, 0xC002000000)]
CAP_PM, CAP_MSI, CAP_PCIE, CAP_MSIX = 0x60, 0x68, 0x78, 0xC8
EXT_AER, EXT_REBAR = 0x100, 0x250


def config_space() -> bytes:
    c = bytearray(4096)

    def put(fmt: str, off: int, *values) -> None:
        struct.pack_into("<" + fmt, c, off, *values)

    put("HH", 0x00, 0x10DE, 0x2330)
    put("HH", 0x04, 0x0006, 0x0010)  # memory + bus master; status: capability list
    put("I", 0x08, 0x030200A1)  # class 03/02/00, revision a1
    put("B", 0x0E, 0x00)
    for index, _size, prefetch, address in BARS:
        low = (address & 0xFFFFFFF0) | 0x4 | (0x8 if prefetch else 0)
        put("II", 0x10 + 4 * index, low, address >> 32)
    put("HH", 0x2C, 0x10DE, 0x16C1)
    put("B", 0x34, CAP_PM)
    put("BBH", CAP_PM, 0x01, CAP_MSI, 0x0003)
    put("BBH", CAP_MSI, 0x05, CAP_PCIE, 0x0080 | (0x5 << 1))  # 64-bit, 32 vectors capable
    put("BBH", CAP_PCIE, 0x10, CAP_MSIX, 0x0002)
    put("I", CAP_PCIE + 0x0C, 0x5 | (16 << 4))  # link capabilities: 32 GT/s x16
    put("H", CAP_PCIE + 0x12, 0x5 | (16 << 4))  # link status: 32 GT/s x16
    put("BBH", CAP_MSIX, 0x11, 0x00, 0x8000 | (9 - 1))  # enabled, 9 vectors
    put("II", CAP_MSIX + 4, 0x00B90000 | 0, 0x00BA0000 | 0)  # table / PBA in BAR0
    put("I", EXT_AER, 0x0001 | (2 << 16) | (EXT_REBAR << 20))
    put("I", EXT_REBAR, 0x0015 | (1 << 16) | (0 << 20))
    sizes = sum(1 << (4 + n) for n in range(6, 18))  # 64 MiB .. 128 GiB supported
    put("II", EXT_REBAR + 4, sizes, 2 | (1 << 5) | (17 << 8))  # BAR2, one entry, 128 GiB now
    return bytes(c)


def resource_file() -> str:
    lines = ["0x%016x 0x%016x 0x%016x" % (0, 0, 0)] * 13
    for index, size, prefetch, address in BARS:
        flags = IORESOURCE_MEM | IORESOURCE_MEM_64 | (IORESOURCE_PREFETCH if prefetch else 0)
        lines[index] = "0x%016x 0x%016x 0x%016x" % (address, address + size - 1, flags)
    return "".join(line + "\n" for line in lines)


def write_tree(name: str, links: str) -> None:
    dev = HERE / name / "devices" / BDF
    dev.mkdir(parents=True, exist_ok=True)
    (dev / "config").write_bytes(config_space())
    (dev / "resource").write_text(resource_file())
    for attr, value in {"vendor": "0x10de", "device": "0x2330", "class": "0x030200", "revision": "0xa1",
                        "subsystem_vendor": "0x10de", "subsystem_device": "0x16c1", "numa_node": "-1",
                        "boot_vga": "0"}.items():
        (dev / attr).write_text(value + "\n")
    (dev / "links").write_text(links)


if __name__ == "__main__":
    write_tree("h100-host", "driver vfio-pci\niommu_group 12\n")
    write_tree("h100-guest", "driver nvidia\n")
    print("wrote", HERE / "h100-host", HERE / "h100-guest")
