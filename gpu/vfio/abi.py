"""The VFIO user ABI of linux/vfio.h: ioctl numbers, flags and structures.

Pure stdlib (ctypes) so the VFIO layer runs inside a minimal guest with no
numpy.  Every request number is computed the way the header does it:
`_IO(VFIO_TYPE, VFIO_BASE + n)` with VFIO_TYPE = ';' and VFIO_BASE = 100.
"""

from __future__ import annotations

import ctypes

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0


def _IO(type_char: str, nr: int) -> int:
    """linux/ioctl.h `_IO`: no direction, no size (VFIO passes argsz inside the struct)."""
    return (_IOC_NONE << _IOC_DIRSHIFT) | (ord(type_char) << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


VFIO_TYPE = ";"
VFIO_BASE = 100


def _vfio(n: int) -> int:
    return _IO(VFIO_TYPE, VFIO_BASE + n)


# container ioctls
VFIO_GET_API_VERSION = _vfio(0)
VFIO_CHECK_EXTENSION = _vfio(1)
VFIO_SET_IOMMU = _vfio(2)
# group ioctls
VFIO_GROUP_GET_STATUS = _vfio(3)
VFIO_GROUP_SET_CONTAINER = _vfio(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio(6)
# device ioctls
VFIO_DEVICE_GET_INFO = _vfio(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio(9)
VFIO_DEVICE_SET_IRQS = _vfio(10)
VFIO_DEVICE_RESET = _vfio(11)
# type1 IOMMU ioctls (on the container)
VFIO_IOMMU_GET_INFO = _vfio(12)
VFIO_IOMMU_MAP_DMA = _vfio(13)
VFIO_IOMMU_UNMAP_DMA = _vfio(14)

VFIO_API_VERSION = 0

# extensions / IOMMU types
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_NOIOMMU_IOMMU = 8

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

# PCI region indexes
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9
REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM",
                7: "config", 8: "VGA"}

# PCI IRQ indexes
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
IRQ_INDEX_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

VFIO_IOMMU_INFO_PGSIZES = 1 << 0


class _Argsz(ctypes.Structure):
    """A VFIO argument struct whose first field `argsz` is its own size."""

    def __init__(self, **fields):
        super().__init__(argsz=ctypes.sizeof(self), **fields)


class vfio_group_status(_Argsz):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_device_info(_Argsz):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
    ]


class vfio_region_info(_Argsz):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


class vfio_irq_info(_Argsz):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_irq_set_eventfd(_Argsz):
    """`struct vfio_irq_set` followed by one int32 eventfd (`data[]`)."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
    ]


class vfio_irq_set(_Argsz):
    """`struct vfio_irq_set` with no data (DATA_NONE)."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_iommu_type1_info(_Argsz):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_map(_Argsz):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(_Argsz):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]
