"""gpu.pci / gpu.pci_config on recorded sysfs trees (tests/data/sysfs) and hand-made config bytes."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ukgpu.gpu.pci.config_space import ConfigError, parse_config
from ukgpu.gpu.pci.sysfs import (
    PciBus,
    PciError,
    PciIds,
    cuda_ordinal,
    normalize_bdf,
    parse_resource,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "data" / "sysfs"))
import sysfs_tree as tree  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
NO_IDS = PciIds(search=())  # hex names, whatever the machine has installed


def bus(tmp_path: Path, *machines: str, ids: PciIds = NO_IDS) -> PciBus:
    root = tmp_path / "sys"
    for name in machines:
        tree.materialize(name, root)
    return PciBus(root, ids)


def test_dev_vm_recording(tmp_path):
    devices = bus(tmp_path, "dev-vm").devices()
    assert [d.bdf for d in devices] == [f"0000:00:0{i}.0" for i in range(6)]
    bridge, *virtio = devices
    assert (bridge.vendor_id, bridge.class_code, bridge.driver) == (0x8086, 0x060000, None)
    for dev in virtio:
        assert dev.vendor_id == 0x1AF4 and dev.driver == "virtio-pci"
        assert dev.iommu_group is None and dev.numa_node is None and not dev.is_nvidia_gpu
        assert dev.config.has_cap("MSI-X") and dev.config.bus_master
    net = next(d for d in devices if d.class_code == 0x020000)
    assert [(b.index, b.size, b.is_64bit, b.prefetchable) for b in net.bars] == [(0, 512 * 1024, True, False)]


def test_h100_constructed_facts(tmp_path):
    (gpu,) = bus(tmp_path, "h100-guest").devices()
    assert gpu.bdf == "0000:00:06.0" and gpu.is_nvidia_gpu
    assert (gpu.vendor_id, gpu.device_id, gpu.class_code >> 8) == (0x10DE, 0x2330, 0x0302)
    assert [(b.index, b.size, b.is_64bit, b.prefetchable) for b in gpu.bars] == [
        (0, 16 * MiB, True, False), (2, 128 * GiB, True, True), (4, 32 * MiB, True, True)]
    assert gpu.largest_bar == 128 * GiB and gpu.driver == "nvidia" and gpu.iommu_group is None
    cfg = gpu.config
    assert [c.name for c in cfg.capabilities] == ["PM", "MSI", "PCIe", "MSI-X"]
    assert [c.name for c in cfg.ext_capabilities] == ["AER", "ResizableBAR"]
    assert (cfg.link.speed_gts, cfg.link.width, cfg.link.max_speed_gts, cfg.link.max_width) == (32.0, 16, 32.0, 16)
    assert cfg.msix.enabled and cfg.msix.table_size == 9 and cfg.msix.table_bar == 0
    (rebar,) = cfg.resizable_bars
    assert rebar.bar == 2 and rebar.current_size == 128 * GiB
    assert rebar.supported_sizes[0] == 64 * MiB and rebar.supported_sizes[-1] == 128 * GiB
    # what the BAR registers say agrees with sysfs resource
    assert [(r.index, r.is_64bit, r.prefetchable) for r in cfg.bar_registers] == [
        (0, True, False), (2, True, True), (4, True, True)]


def test_qemu_guest_recording_edu_and_groups(tmp_path):
    b = bus(tmp_path, "qemu-edu")
    edu = b.device("0000:00:01.0")
    assert (edu.vendor_id, edu.device_id, edu.driver, edu.iommu_group) == (0x1234, 0x11E8, "vfio-pci", 1)
    assert [(x.index, x.size, x.is_64bit) for x in edu.bars] == [(0, MiB, False)]
    assert edu.config.msi.vectors == 1 and edu.config.msi.is_64bit
    sata = b.device("0000:00:1f.2")
    assert [(x.index, x.is_io, x.size) for x in sata.bars] == [(4, True, 32), (5, False, 4096)]
    assert {d.bdf for d in b.devices() if d.iommu_group == 3} == {"0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"}


def test_qemu_guest_recording_pcie_root_port(tmp_path):
    port = bus(tmp_path, "qemu-edu").device("0000:00:02.0")  # QEMU pcie-root-port (1b36:000c)
    assert (port.vendor_id, port.device_id, port.class_code, port.driver) == (0x1B36, 0x000C, 0x060400, "pcieport")
    cfg = port.config
    assert cfg.header_type == 1 and [c.name for c in cfg.capabilities] == ["PCIe", "MSI-X", "SSVID"]
    assert [c.name for c in cfg.ext_capabilities] == ["AER", "ACS"]
    # QEMU 7.2's root port can do 16 GT/s x32; the link trained down to the PCI bridge behind it
    assert (cfg.link.speed_gts, cfg.link.width, cfg.link.max_speed_gts, cfg.link.max_width) == (2.5, 1, 16.0, 32)
    assert str(cfg.link) == "2.5 GT/s x1 (max 16 GT/s x32)"


def test_qemu_guest_recording_shared_group_behind_pci_bridge(tmp_path):
    b = bus(tmp_path, "qemu-edu")
    bridge = b.device("0000:01:00.0")  # pcie-pci-bridge
    assert bridge.class_code == 0x060400 and [c.name for c in bridge.config.capabilities] == ["MSI", "PM", "PCIe", "SHPC"]
    uart = b.device("0000:02:02.0")
    assert (uart.class_code, uart.driver) == (0x070002, "serial")
    assert [(x.index, x.is_io, x.size) for x in uart.bars] == [(0, True, 8)]
    assert {d.bdf for d in b.devices() if d.iommu_group == 4} == {"0000:01:00.0", "0000:02:01.0", "0000:02:02.0"}


def test_nvidia_gpus_listed_first(tmp_path):
    b = bus(tmp_path, "dev-vm", "h100-guest")
    devices = b.devices()
    assert devices[0].bdf == "0000:00:06.0" and len(devices) == 7
    assert [d.bdf for d in b.nvidia_gpus()] == ["0000:00:06.0"]


def test_names_from_pci_ids(tmp_path):
    ids_file = tmp_path / "pci.ids"
    ids_file.write_text("# comment\n10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n"
                        "\t\t10de 16c1  H100 SXM5 80GB\n1af4  Red Hat, Inc.\nC 00  Unclassified device\n")
    (gpu,) = bus(tmp_path, "h100-guest", ids=PciIds(ids_file)).devices()
    assert gpu.vendor_name == "NVIDIA Corporation" and gpu.device_name == "GH100 [H100 SXM5 80GB]"
    ids = PciIds(ids_file)
    assert ids.vendor(0x1AF4) == "Red Hat, Inc." and ids.device(0x1AF4, 0x1041) == "1041"
    assert NO_IDS.vendor(0x10DE) == "10de"


def test_missing_device_and_missing_sysfs(tmp_path):
    with pytest.raises(PciError, match="ukgpu pci"):
        bus(tmp_path, "dev-vm").device("0000:00:09.0")
    with pytest.raises(PciError, match="sysfs mounted"):
        PciBus(tmp_path / "nothing", NO_IDS).devices()


def test_binding_facts_one_at_a_time(tmp_path):
    """What the VFIO layer and the host setup read: no config space, no pci.ids."""
    b = PciBus(tree.materialize("qemu-edu", tmp_path / "sys"))
    assert (b.driver("0000:00:01.0"), b.iommu_group("0000:00:01.0")) == ("vfio-pci", 1)
    assert (b.driver("0000:00:09.0"), b.iommu_group("0000:00:09.0")) == (None, None)  # no such device
    assert b.iommu_enabled() and b.driver_loaded("vfio-pci") and not b.driver_loaded("nvidia")
    assert b.group_members(2) == {"0000:00:02.0": "pcieport"} and b.group_members(99) == {}
    assert not b.is_boot_vga("0000:00:01.0")
    (b.device_dir("0000:00:01.0") / "boot_vga").write_text("1\n")
    assert b.is_boot_vga("0000:00:01.0")
    (b.device_dir("0000:00:01.0") / "virtio0/net/eth0").mkdir(parents=True)
    (b.device_dir("0000:00:01.0") / "drm/card0").mkdir(parents=True)
    assert b.class_devices("0000:00:01.0", "net") == ["eth0"]
    assert b.class_devices("0000:00:01.0", "net", nested=False) == []
    assert b.class_devices("0000:00:01.0", "drm") == ["card0"]
    assert b._ids is None, "binding facts must not load pci.ids"
    dev_vm = PciBus(tree.materialize("dev-vm", tmp_path / "vm"))
    assert not dev_vm.iommu_enabled() and dev_vm.iommu_group("0000:00:01.0") is None


def test_short_config_read_as_user(tmp_path):
    b = bus(tmp_path, "h100-guest")
    cfg_file = b.devices_dir / "0000:00:06.0" / "config"
    cfg_file.write_bytes(cfg_file.read_bytes()[:64])
    gpu = b.device("0000:00:06.0")
    assert gpu.config.capabilities == [] and gpu.config.link is None
    assert any("64 config bytes" in n for n in gpu.notes)
    assert gpu.bars[1].size == 128 * GiB  # sizes still come from resource


def _config(**regs) -> bytearray:
    c = bytearray(256)
    struct.pack_into("<HHHH", c, 0, 0x1234, 0x5678, 0x0000, 0x0010)
    return c


def test_capability_loop_terminates():
    c = _config()
    c[0x34] = 0x40
    c[0x40:0x42] = bytes([0x01, 0x50])
    c[0x50:0x52] = bytes([0x05, 0x40])  # points back at 0x40
    cfg = parse_config(bytes(c))
    assert [(x.name, x.offset) for x in cfg.capabilities] == [("PM", 0x40), ("MSI", 0x50)]


def test_config_errors():
    with pytest.raises(ConfigError, match="at least 64"):
        parse_config(b"\0" * 32)
    with pytest.raises(ConfigError, match="no device"):
        parse_config(b"\xff" * 64)


def test_bar_registers_io_and_32bit():
    c = _config()
    struct.pack_into("<III", c, 0x10, 0xC001, 0xFE000008, 0x0000000C)
    regs = parse_config(bytes(c)).bar_registers
    assert (regs[0].is_io, regs[0].address) == (True, 0xC000)
    assert (regs[1].is_64bit, regs[1].prefetchable, regs[1].address) == (False, True, 0xFE000000)
    assert regs[2].is_64bit and regs[2].index == 2 and regs[3].index == 4


def test_parse_resource_flags():
    text = ("0x000000000000c000 0x000000000000c01f 0x0000000000040101\n"
            "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
            "0x00000000fe000000 0x00000000fe0fffff 0x0000000000042208\n")
    bars = parse_resource(text)
    assert [(b.index, b.size, b.is_io, b.prefetchable, b.is_64bit) for b in bars] == [
        (0, 32, True, False, False), (2, MiB, False, True, False)]


@pytest.mark.parametrize("text,want", [("0:6.0", "0000:00:06.0"), ("00000000:00:06.0", "0000:00:06.0"),
                                       ("0000:3B:00.1", "0000:3b:00.1"), ("3b:00.0", "0000:3b:00.0")])
def test_normalize_bdf(text, want):
    assert normalize_bdf(text) == want


def test_normalize_bdf_rejects_garbage():
    with pytest.raises(PciError, match="DOMAIN:BUS:DEVICE.FUNCTION"):
        normalize_bdf("06.0.1")


def test_cuda_ordinal_by_bus_id():
    cuda_ids = ["00000000:3B:00.0", "0000:00:06.0", "0001:00:06.0"]
    assert cuda_ordinal("0000:00:06.0", cuda_ids) == 1
    assert cuda_ordinal("0000:3b:00.0", cuda_ids) == 0
    assert cuda_ordinal("1:0:6.0", cuda_ids) == 2
    assert cuda_ordinal("0000:00:07.0", cuda_ids) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=64, max_size=4096))
def test_parse_config_never_crashes_on_garbage(data):
    """Any bytes either parse (with walks that stay inside the data) or raise ConfigError."""
    try:
        cfg = parse_config(data)
    except ConfigError:
        return
    assert all(0x40 <= c.offset < len(data) for c in cfg.capabilities)
    assert all(0x100 <= c.offset < len(data) for c in cfg.ext_capabilities)
    assert len(cfg.capabilities) <= 48 and len(cfg.ext_capabilities) <= 960
