"""QEMU arguments that pass a host PCI device (a GPU) through to the guest with VFIO.

`qemu_vfio_args(bdf)` gives `-device vfio-pci,host=BDF` plus a q35 64-bit MMIO
hole large enough for the device's BARs (a 128 GiB BAR2 does not fit QEMU's
default hole).  The launcher adds them to a `-M q35` command line.  Pure stdlib.
"""

from __future__ import annotations

import os

from ukgpu.gpu.pci.sysfs import Bar, PciBus, normalize_bdf
from ukgpu.gpu.vfio.iommu import VFIO_DRIVER, VfioError

MIN_WINDOW = 1 << 32  # QEMU's q35 default hole is a few GiB: never go below 4 GiB


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def mmio_window_size(bars: list[Bar]) -> int:
    """Power-of-two 64-bit MMIO hole that holds every memory BAR with headroom.

    At least twice the largest BAR (so alignment never runs out of room) and at
    least the next power of two above all memory BARs together.
    """
    memory = [b.size for b in bars if not b.is_io]
    if not memory:
        return MIN_WINDOW
    return max(MIN_WINDOW, _next_pow2(sum(memory)), 2 * _next_pow2(max(memory)))


def qemu_vfio_args(bdf: str, sysfs_root: str | os.PathLike = "/sys", require_bound: bool = True) -> list[str]:
    """QEMU arguments for a q35 guest: the MMIO hole, then the vfio-pci device."""
    dev = PciBus(sysfs_root).device(normalize_bdf(bdf))
    if require_bound and dev.driver != VFIO_DRIVER:
        raise VfioError(f"{dev.bdf} is bound to {dev.driver or 'no driver'}, not {VFIO_DRIVER}: "
                        f"run `ukgpu vfio bind {dev.bdf} --yes` first")
    window = mmio_window_size(dev.bars)
    return ["-global", f"q35-pcihost.pci-hole64-size={window}",
            "-device", f"{VFIO_DRIVER},host={dev.bdf}"]
