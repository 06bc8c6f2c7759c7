"""The IOMMU side of VFIO: containers, groups and DMA mappings, and the ioctl helper they share.

A container holds the IOMMU context (TYPE1v2) and the DMA mappings (page-aligned anonymous
memory mapped at an IOVA the device may reach); a group is the unit of isolation the kernel
hands out (/dev/vfio/N) and joins a container.  Group numbers and members come from sysfs
through `gpu.pci.sysfs`.  `device.py` builds the device side (regions, BARs, IRQs) on these.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass

from ukgpu.gpu.pci.sysfs import PciBus
from ukgpu.gpu.vfio import abi
from ukgpu.llama_core.errors import UkgpuError

PAGE_SIZE = mmap.PAGESIZE
VFIO_DRIVER = "vfio-pci"  # the kernel driver that hands a PCI device to VFIO


class VfioError(UkgpuError):
    """A VFIO step failed; the message names the fix."""


def _ioctl(fd: int, request: int, arg=0, what: str = "") -> int:
    """ioctl returning the kernel's return value.

    `arg` is an int or a *mutable* buffer (ctypes struct, bytearray): the kernel
    fills it in place.  With an immutable `bytes` argument fcntl would return a
    copy of the buffer instead of the return value (a file descriptor, say).
    """
    try:
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        raise VfioError(f"{what or hex(request)} failed: {os.strerror(exc.errno)} (errno {exc.errno})") from exc


def _release(steps) -> None:
    """Run every release step even if some fail; re-raise the first failure afterwards."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as exc:  # keep releasing: a leaked fd pins the device
            first = first or exc
    if first is not None:
        raise first


# ---------------------------------------------------------------- diagnostics (facts from gpu.pci.sysfs)

def iommu_group_of(bdf: str, sysfs_root: str | os.PathLike = "/sys") -> int:
    """The IOMMU group number of a PCI device, or a VfioError saying how to get one."""
    bus = PciBus(sysfs_root)
    if not bus.device_dir(bdf).exists():
        raise VfioError(f"no PCI device {bdf}: check the address with `ukgpu pci`")
    group = bus.iommu_group(bdf)
    if group is None:
        if not bus.iommu_enabled():
            raise VfioError(
                "no IOMMU groups: enable the IOMMU (VT-d/AMD-Vi in firmware, then boot with "
                "intel_iommu=on or amd_iommu=on iommu=pt)")
        raise VfioError(f"{bdf} has no IOMMU group: it cannot be used with VFIO")
    return group


def group_members(group: int, sysfs_root: str | os.PathLike = "/sys") -> dict[str, str | None]:
    """{bdf: driver or None} for every device in an IOMMU group."""
    return PciBus(sysfs_root).group_members(group)


def _not_viable_message(group: int, sysfs_root) -> str:
    blockers = [f"{bdf} is bound to {drv}" for bdf, drv in group_members(group, sysfs_root).items()
                if drv not in (None, VFIO_DRIVER, "pcieport")]
    detail = "; ".join(blockers) or "a member device is bound to a host driver"
    return (f"IOMMU group {group} is not viable: {detail}. Bind every device of the group to "
            f"vfio-pci (`ukgpu vfio bind BDF --yes`) or unbind it")


# ---------------------------------------------------------------- container

@dataclass
class DmaMapping:
    """A pinned, page-aligned anonymous buffer mapped at `iova` for the device."""

    iova: int
    size: int
    buffer: mmap.mmap
    vaddr: int

    @property
    def view(self) -> memoryview:
        return memoryview(self.buffer)


class Container:
    """/dev/vfio/vfio: the IOMMU context that groups attach to and DMA maps live in."""

    def __init__(self, path: str = "/dev/vfio/vfio"):
        if not os.path.exists(path):
            raise VfioError(f"{path} is missing: load the VFIO driver (`modprobe vfio-pci`)")
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.mappings: list[DmaMapping] = []
        try:
            self.api_version = _ioctl(self.fd, abi.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
            if self.api_version != abi.VFIO_API_VERSION:
                raise VfioError(f"unknown VFIO API version {self.api_version}: this kernel is not supported")
        except VfioError:
            self.close()
            raise

    def check_extension(self, ext: int) -> bool:
        return _ioctl(self.fd, abi.VFIO_CHECK_EXTENSION, ext, "VFIO_CHECK_EXTENSION") > 0

    def set_iommu(self, iommu_type: int = abi.VFIO_TYPE1v2_IOMMU) -> None:
        if not self.check_extension(iommu_type):
            raise VfioError(f"IOMMU type {iommu_type} unsupported: load vfio_iommu_type1")
        try:
            fcntl.ioctl(self.fd, abi.VFIO_SET_IOMMU, iommu_type)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise VfioError(
                    "VFIO_SET_IOMMU: EPERM: the platform lacks interrupt remapping (do not boot with "
                    "intremap=off; as a last resort load vfio_iommu_type1 allow_unsafe_interrupts=1)"
                ) from exc
            raise VfioError(f"VFIO_SET_IOMMU failed: {os.strerror(exc.errno)}") from exc

    def iommu_pgsizes(self) -> int:
        info = abi.vfio_iommu_type1_info()
        _ioctl(self.fd, abi.VFIO_IOMMU_GET_INFO, info, "VFIO_IOMMU_GET_INFO")
        return info.iova_pgsizes if info.flags & abi.VFIO_IOMMU_INFO_PGSIZES else 0

    def map_dma(self, size: int, iova: int, read: bool = True, write: bool = True) -> DmaMapping:
        """Allocate a page-aligned anonymous buffer and map it for device DMA at `iova`."""
        if size <= 0 or size % PAGE_SIZE or iova % PAGE_SIZE:
            raise VfioError(f"DMA size {size:#x} and IOVA {iova:#x} must be positive multiples of {PAGE_SIZE:#x}")
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(buffer)
        vaddr = ctypes.addressof(anchor)
        del anchor
        flags = (abi.VFIO_DMA_MAP_FLAG_READ if read else 0) | (abi.VFIO_DMA_MAP_FLAG_WRITE if write else 0)
        req = abi.vfio_iommu_type1_dma_map(flags=flags, vaddr=vaddr, iova=iova, size=size)
        try:
            fcntl.ioctl(self.fd, abi.VFIO_IOMMU_MAP_DMA, req, True)
        except OSError as exc:
            buffer.close()
            hint = {errno.ENOMEM: ": the pages are pinned, so raise the locked-memory limit (ulimit -l) "
                                  "or run as root",
                    errno.EEXIST: ": that IOVA range is already mapped"}.get(exc.errno, "")
            raise VfioError(f"VFIO_IOMMU_MAP_DMA iova={iova:#x} size={size:#x} failed: "
                            f"{os.strerror(exc.errno)}{hint}") from exc
        mapping = DmaMapping(iova, size, buffer, vaddr)
        self.mappings.append(mapping)
        return mapping

    def unmap_dma(self, mapping: DmaMapping) -> int:
        """Remove the device's access to a mapping and free its buffer (release any `view` first).

        Returns the bytes the kernel unmapped."""
        req = abi.vfio_iommu_type1_dma_unmap(flags=0, iova=mapping.iova, size=mapping.size)
        _ioctl(self.fd, abi.VFIO_IOMMU_UNMAP_DMA, req, f"VFIO_IOMMU_UNMAP_DMA iova={mapping.iova:#x}")
        self.mappings.remove(mapping)
        mapping.buffer.close()
        return req.size

    def unmap_all(self) -> None:
        for mapping in reversed(list(self.mappings)):
            self.unmap_dma(mapping)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- group

class Group:
    """/dev/vfio/N: an IOMMU group; every device in it must belong to VFIO."""

    def __init__(self, number: int, dev_root: str = "/dev/vfio", sysfs_root: str = "/sys"):
        self.number = number
        path = os.path.join(dev_root, str(number))
        if not os.path.exists(path):
            raise VfioError(f"{path} is missing: bind the group's devices to vfio-pci "
                            f"(`ukgpu vfio bind BDF --yes`)")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VfioError(f"cannot open {path}: {os.strerror(exc.errno)} (is another process "
                            f"using the group, or do you lack permission?)") from exc
        self.container: Container | None = None
        if not self.status() & abi.VFIO_GROUP_FLAGS_VIABLE:
            self.close()
            raise VfioError(_not_viable_message(number, sysfs_root))

    def status(self) -> int:
        st = abi.vfio_group_status()
        _ioctl(self.fd, abi.VFIO_GROUP_GET_STATUS, st, "VFIO_GROUP_GET_STATUS")
        return st.flags

    def set_container(self, container: Container) -> None:
        _ioctl(self.fd, abi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container.fd), "VFIO_GROUP_SET_CONTAINER")
        self.container = container

    def device_fd(self, bdf: str) -> int:
        name = bytearray(bdf.encode() + b"\0")
        return _ioctl(self.fd, abi.VFIO_GROUP_GET_DEVICE_FD, name, f"VFIO_GROUP_GET_DEVICE_FD {bdf}")

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, container, self.fd, self.container = self.fd, self.container, -1, None
        steps = [lambda: _ioctl(fd, abi.VFIO_GROUP_UNSET_CONTAINER, 0, "VFIO_GROUP_UNSET_CONTAINER")]
        _release((steps if container is not None else []) + [lambda: os.close(fd)])
