"""gpu.vfio pieces that run without a VFIO device: errors with fixes, MMIO accessors, eventfds.

The real ioctls are exercised in tests/integration/test_vfio_edu.py (QEMU edu guest).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ukgpu.gpu.vfio import iommu as vfio
from ukgpu.gpu.vfio.device import (
    Container,
    Group,
    IrqEventfd,
    Mmio,
    RegionInfo,
    VfioError,
    VfioSession,
)
from ukgpu.llama_core.errors import UkgpuError

sys.path.insert(0, str(Path(__file__).parents[1] / "data" / "sysfs"))
import sysfs_tree as tree  # noqa: E402


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_missing_container_says_load_vfio_pci(tmp_path):
    with pytest.raises(VfioError, match="modprobe vfio-pci"):
        Container(str(tmp_path / "vfio"))
    assert issubclass(VfioError, UkgpuError)


def test_container_on_a_non_vfio_file_fails_cleanly():
    before = open_fds()
    with pytest.raises(VfioError, match="VFIO_GET_API_VERSION failed"):
        Container("/dev/null")
    assert open_fds() == before  # the fd was closed


def test_no_iommu_groups_says_enable_the_iommu(tmp_path):
    root = tree.materialize("dev-vm", tmp_path / "sys")
    with pytest.raises(VfioError, match="intel_iommu=on or amd_iommu=on"):
        vfio.iommu_group_of("0000:00:01.0", root)
    with pytest.raises(VfioError, match="intel_iommu=on"):
        VfioSession("0000:00:01.0", sysfs_root=str(root), dev_root=str(tmp_path / "dev"))


def test_group_of_recorded_guest(tmp_path):
    root = tree.materialize("qemu-edu", tmp_path / "sys")
    assert vfio.iommu_group_of("0000:00:01.0", root) == 1
    assert vfio.group_members(3, root) == {"0000:00:1f.0": None, "0000:00:1f.2": None, "0000:00:1f.3": None}
    assert vfio.group_members(2, root) == {"0000:00:02.0": "pcieport"}
    with pytest.raises(VfioError, match="no PCI device"):
        vfio.iommu_group_of("0000:00:09.0", root)


def test_missing_group_file_says_bind(tmp_path):
    with pytest.raises(VfioError, match="ukgpu vfio bind"):
        Group(1, dev_root=str(tmp_path))


def test_not_viable_names_the_recorded_host_driver(tmp_path):
    root = tree.materialize("qemu-edu", tmp_path / "sys")  # edu 02:01.0 shares group 4 with a UART
    message = vfio._not_viable_message(4, root)
    assert "0000:02:02.0 is bound to serial" in message and "0000:02:01.0" not in message


def test_not_viable_names_device_and_driver(tmp_path):
    root = tree.materialize("qemu-edu", tmp_path / "sys")
    tree.set_driver(root, "0000:00:1f.2", "ahci")
    message = vfio._not_viable_message(3, root)
    assert "0000:00:1f.2 is bound to ahci" in message and "0000:00:1f.3" not in message


def _region_file(tmp_path, size=4096) -> tuple[int, RegionInfo]:
    path = tmp_path / "bar"
    path.write_bytes(bytes(size))
    return os.open(path, os.O_RDWR), RegionInfo(0, 0x7, size, 0)


def test_mmio_accessors_are_little_endian_and_sized(tmp_path):
    fd, region = _region_file(tmp_path)
    bar = Mmio(fd, region)
    bar.write32(0x04, 0x11223344)
    bar.write64(0x80, 0x0102030405060708)
    bar.write32(0x10, -1)  # masked to 32 bits
    assert bar.read32(0x04) == 0x11223344 and bar.read64(0x80) == 0x0102030405060708
    assert bar.read32(0x84) == 0x01020304 and bar.read32(0x10) == 0xFFFFFFFF
    bar.close()
    data = os.pread(fd, 0x90, 0)
    os.close(fd)
    assert data[4:8] == bytes([0x44, 0x33, 0x22, 0x11]) and data[0x80] == 0x08 and data[8:0x10] == bytes(8)


def test_eventfd_counts_and_times_out():
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    irq = IrqEventfd(efd)
    assert irq.wait(0.01) == 0
    os.eventfd_write(efd, 2)
    os.eventfd_write(efd, 1)
    assert irq.wait(1.0) == 3 and irq.wait(0) == 0
    os.close(efd)


def test_release_runs_every_step_and_reraises_the_first_failure():
    ran = []

    def fail(name):
        ran.append(name)
        raise VfioError(name)

    with pytest.raises(VfioError, match="first"):
        vfio._release([lambda: fail("first"), lambda: ran.append("middle"), lambda: fail("last")])
    assert ran == ["first", "middle", "last"]
