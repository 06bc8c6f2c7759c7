"""gpu.vfio_abi matches linux/vfio.h: request numbers, struct sizes and field offsets."""

from __future__ import annotations

import ctypes

import pytest

from ukgpu.gpu.vfio import abi

# The values the kernel headers produce (_IO(';', 100 + n)), as seen in strace/QEMU sources.
REQUESTS = {
    "VFIO_GET_API_VERSION": 0x3B64, "VFIO_CHECK_EXTENSION": 0x3B65, "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67, "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_UNSET_CONTAINER": 0x3B69, "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B, "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
    "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D, "VFIO_DEVICE_SET_IRQS": 0x3B6E, "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_IOMMU_GET_INFO": 0x3B70, "VFIO_IOMMU_MAP_DMA": 0x3B71, "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
}


@pytest.mark.parametrize("name,value", sorted(REQUESTS.items()))
def test_request_numbers(name, value):
    assert getattr(abi, name) == value


@pytest.mark.parametrize("struct,size,offsets", [
    (abi.vfio_group_status, 8, {"flags": 4}),
    (abi.vfio_device_info, 16, {"num_regions": 8, "num_irqs": 12}),
    (abi.vfio_region_info, 32, {"index": 8, "cap_offset": 12, "size": 16, "offset": 24}),
    (abi.vfio_irq_info, 16, {"index": 8, "count": 12}),
    (abi.vfio_irq_set, 20, {"index": 8, "start": 12, "count": 16}),
    (abi.vfio_irq_set_eventfd, 24, {"count": 16, "fd": 20}),
    (abi.vfio_iommu_type1_info, 16, {"iova_pgsizes": 8}),
    (abi.vfio_iommu_type1_dma_map, 32, {"vaddr": 8, "iova": 16, "size": 24}),
    (abi.vfio_iommu_type1_dma_unmap, 24, {"iova": 8, "size": 16}),
])
def test_struct_layout(struct, size, offsets):
    assert ctypes.sizeof(struct) == size
    for field, offset in offsets.items():
        assert getattr(struct, field).offset == offset
    assert struct().argsz == size  # argsz fills itself in


def test_constants():
    assert (abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_NOIOMMU_IOMMU) == (3, 8)
    assert (abi.VFIO_PCI_CONFIG_REGION_INDEX, abi.VFIO_PCI_NUM_REGIONS) == (7, 9)
    assert (abi.VFIO_PCI_MSI_IRQ_INDEX, abi.VFIO_PCI_MSIX_IRQ_INDEX) == (1, 2)
    assert abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_TRIGGER == 0x24
