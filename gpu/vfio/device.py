"""The VFIO user API, device side: regions, BAR mmaps, config space, IRQ eventfds, and the session
that opens container, group and device together (the IOMMU side is `iommu.py`).

Pure stdlib (`fcntl.ioctl` + ctypes structures from `vfio.abi`; sysfs facts
from `gpu.pci.sysfs`), so it also runs inside a minimal guest.  Typical use::

    with open_device("0000:00:03.0") as s:
        bar0 = s.device.map_bar(0)
        print(hex(bar0.read32(0)))
        buf = s.container.map_dma(4096, iova=0x100000)

Everything a session opens (IRQ eventfds, BAR mmaps, DMA maps, fds) is released
in reverse order when it closes.  Failures raise `VfioError` saying what to fix.
"""

from __future__ import annotations

import mmap
import os
import select
from dataclasses import dataclass

from ukgpu.gpu.vfio import abi
from ukgpu.gpu.vfio.iommu import Container, Group, VfioError, _ioctl, _release, iommu_group_of

PAGE_SIZE = mmap.PAGESIZE
VFIO_DRIVER = "vfio-pci"  # the kernel driver that hands a PCI device to VFIO


# ---------------------------------------------------------------- device

@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & abi.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int
    count: int


class Mmio:
    """A BAR mapped into this process; 32/64-bit accesses are single native loads/stores."""

    def __init__(self, fd: int, region: RegionInfo):
        self.region = region
        self._map = mmap.mmap(fd, region.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=region.offset)
        self._u32 = memoryview(self._map).cast("I")  # (size/4,)
        self._u64 = memoryview(self._map).cast("Q")  # (size/8,)

    def read32(self, offset: int) -> int:
        return self._u32[offset >> 2]

    def write32(self, offset: int, value: int) -> None:
        self._u32[offset >> 2] = value & 0xFFFFFFFF

    def read64(self, offset: int) -> int:
        return self._u64[offset >> 3]

    def write64(self, offset: int, value: int) -> None:
        self._u64[offset >> 3] = value & 0xFFFFFFFFFFFFFFFF

    def close(self) -> None:
        self._u32.release()
        self._u64.release()
        self._map.close()


class IrqEventfd:
    """An eventfd the kernel signals when the device raises the interrupt."""

    def __init__(self, fd: int):
        self.fd = fd

    def wait(self, timeout: float) -> int:
        """Interrupts counted since the last wait (0 on timeout)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.eventfd_read(self.fd) if ready else 0


class Device:
    """A VFIO device fd: regions, config space, BAR mmaps, IRQs and reset."""

    def __init__(self, group: Group, bdf: str):
        self.bdf = bdf
        self.fd = group.device_fd(bdf)
        self._maps: list[Mmio] = []
        self._irqs: list[tuple[int, IrqEventfd]] = []
        info = abi.vfio_device_info()
        _ioctl(self.fd, abi.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        self.flags, self.num_regions, self.num_irqs = info.flags, info.num_regions, info.num_irqs

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & abi.VFIO_DEVICE_FLAGS_PCI)

    def region_info(self, index: int) -> RegionInfo:
        info = abi.vfio_region_info(index=index)
        _ioctl(self.fd, abi.VFIO_DEVICE_GET_REGION_INFO, info, f"VFIO_DEVICE_GET_REGION_INFO {index}")
        return RegionInfo(index, info.flags, info.size, info.offset)

    def map_bar(self, bar: int) -> Mmio:
        region = self.region_info(abi.VFIO_PCI_BAR0_REGION_INDEX + bar)
        if region.size == 0:
            raise VfioError(f"{self.bdf} BAR{bar} is not implemented")
        if not region.mmappable:
            raise VfioError(f"{self.bdf} BAR{bar} cannot be mmapped: use region_read/region_write")
        mapping = Mmio(self.fd, region)
        self._maps.append(mapping)
        return mapping

    def region_read(self, index: int, offset: int, size: int) -> int:
        region = self.region_info(index)
        data = os.pread(self.fd, size, region.offset + offset)
        if len(data) != size:
            raise VfioError(f"short read of region {index} at {offset:#x}")
        return int.from_bytes(data, "little")

    def region_write(self, index: int, offset: int, size: int, value: int) -> None:
        region = self.region_info(index)
        if os.pwrite(self.fd, value.to_bytes(size, "little"), region.offset + offset) != size:
            raise VfioError(f"short write of region {index} at {offset:#x}")

    def config_read(self, offset: int, size: int) -> int:
        return self.region_read(abi.VFIO_PCI_CONFIG_REGION_INDEX, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.region_write(abi.VFIO_PCI_CONFIG_REGION_INDEX, offset, size, value)

    def enable_bus_master(self) -> None:
        """Set Memory Space + Bus Master in the command register (off after binding)."""
        command = self.config_read(0x04, 2)
        self.config_write(0x04, 2, command | 0x6)

    def irq_info(self, index: int) -> IrqInfo:
        info = abi.vfio_irq_info(index=index)
        _ioctl(self.fd, abi.VFIO_DEVICE_GET_IRQ_INFO, info, f"VFIO_DEVICE_GET_IRQ_INFO {index}")
        return IrqInfo(index, info.flags, info.count)

    def irq_eventfd(self, index: int = abi.VFIO_PCI_MSI_IRQ_INDEX, vector: int = 0) -> IrqEventfd:
        """Route one vector of IRQ `index` (INTx/MSI/MSI-X) to a new eventfd."""
        info = self.irq_info(index)
        name = abi.IRQ_INDEX_NAMES.get(index, index)
        if vector >= info.count or not info.flags & abi.VFIO_IRQ_INFO_EVENTFD:
            raise VfioError(f"{self.bdf} has no eventfd-capable {name} vector {vector} ({info.count} vectors)")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        req = abi.vfio_irq_set_eventfd(
            flags=abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_TRIGGER,
            index=index, start=vector, count=1, fd=efd)
        try:
            _ioctl(self.fd, abi.VFIO_DEVICE_SET_IRQS, req, "VFIO_DEVICE_SET_IRQS")
        except VfioError:
            os.close(efd)
            raise
        irq = IrqEventfd(efd)
        self._irqs.append((index, irq))
        return irq

    def _disable_irq(self, index: int) -> None:
        req = abi.vfio_irq_set(flags=abi.VFIO_IRQ_SET_DATA_NONE | abi.VFIO_IRQ_SET_ACTION_TRIGGER,
                               index=index, start=0, count=0)
        _ioctl(self.fd, abi.VFIO_DEVICE_SET_IRQS, req, "VFIO_DEVICE_SET_IRQS (disable)")

    def reset(self) -> None:
        if not self.flags & abi.VFIO_DEVICE_FLAGS_RESET:
            raise VfioError(f"{self.bdf} does not support VFIO_DEVICE_RESET")
        _ioctl(self.fd, abi.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")

    def close(self) -> None:
        """Disable IRQs and close their eventfds, unmap BARs, close the device fd."""
        if self.fd < 0:
            return
        indexes = list(dict.fromkeys(index for index, _ in reversed(self._irqs)))
        steps = [lambda index=index: self._disable_irq(index) for index in indexes]  # once per index
        steps += [lambda fd=irq.fd: os.close(fd) for _, irq in reversed(self._irqs)]
        steps += [m.close for m in reversed(self._maps)]
        fd = self.fd
        steps.append(lambda: os.close(fd))
        self._irqs, self._maps = [], []
        try:
            _release(steps)
        finally:
            self.fd = -1


# ---------------------------------------------------------------- session

class VfioSession:
    """Container + group + device for one PCI device, released in reverse order."""

    def __init__(self, bdf: str, sysfs_root: str = "/sys", dev_root: str = "/dev/vfio",
                 iommu_type: int = abi.VFIO_TYPE1v2_IOMMU):
        group_number = iommu_group_of(bdf, sysfs_root)
        self.container = Container(os.path.join(dev_root, "vfio"))
        self.group: Group | None = None
        self.device: Device | None = None
        try:
            self.group = Group(group_number, dev_root, sysfs_root)
            self.group.set_container(self.container)
            self.container.set_iommu(iommu_type)
            self.device = Device(self.group, bdf)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Device first (quiesces it: vfio-pci resets it on release), then DMA maps, group, container."""
        steps = [self.device.close] if self.device is not None else []
        steps.append(self.container.unmap_all)
        if self.group is not None:
            steps.append(self.group.close)
        steps.append(self.container.close)
        _release(steps)

    def __enter__(self) -> VfioSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(session: VfioSession) -> dict:
    """What VFIO reports about an open PCI device: regions, IRQs, ids, BAR0's first register."""
    dev = session.device
    regions = []
    for index in range(min(dev.num_regions, abi.VFIO_PCI_NUM_REGIONS)):
        try:
            info = dev.region_info(index)
        except VfioError:  # the VGA region exists only for VGA-class devices
            regions.append({"index": index, "name": abi.REGION_NAMES[index], "size": None, "flags": ""})
            continue
        flags = "".join(c for c, bit in (("r", abi.VFIO_REGION_INFO_FLAG_READ), ("w", abi.VFIO_REGION_INFO_FLAG_WRITE),
                                         ("m", abi.VFIO_REGION_INFO_FLAG_MMAP)) if info.flags & bit)
        regions.append({"index": index, "name": abi.REGION_NAMES[index], "size": info.size, "flags": flags})
    irqs = {}
    for index in range(min(dev.num_irqs, len(abi.IRQ_INDEX_NAMES))):
        try:
            irqs[abi.IRQ_INDEX_NAMES[index]] = dev.irq_info(index).count
        except VfioError:  # ERR/REQ exist only for PCIe devices
            irqs[abi.IRQ_INDEX_NAMES[index]] = None
    out = {"bdf": dev.bdf, "api_version": session.container.api_version, "flags": dev.flags,
           "reset": bool(dev.flags & abi.VFIO_DEVICE_FLAGS_RESET), "regions": regions, "irqs": irqs,
           "vendor_id": dev.config_read(0x00, 2), "device_id": dev.config_read(0x02, 2)}
    if regions and regions[0]["size"] >= 4 and "m" in regions[0]["flags"]:
        out["bar0_reg0"] = dev.map_bar(0).read32(0)  # NVIDIA: PMC_BOOT_0, the chip id
    return out


def open_device(bdf: str, sysfs_root: str = "/sys", dev_root: str = "/dev/vfio") -> VfioSession:
    """Open a PCI device bound to vfio-pci: `with open_device(bdf) as s: s.device...`."""
    return VfioSession(bdf, sysfs_root, dev_root)
