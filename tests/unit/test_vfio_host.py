"""Host preparation (gpu.vfio_host, gpu.passthrough, `ukgpu vfio`) on writable sysfs trees."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from ukgpu.gpu.pci.sysfs import Bar, PciIds
from ukgpu.gpu.vfio.host import VfioHost
from ukgpu.gpu.vfio.iommu import VfioError
from ukgpu.gpu.vfio.passthrough import mmio_window_size, qemu_vfio_args
from ukgpu.tools.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "data" / "sysfs"))
import sysfs_tree as tree  # noqa: E402

GPU = "0000:00:06.0"
GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def host_tree(tmp_path) -> tuple[Path, Path]:
    """The H100 host with the GPU still on nvidia, beside the dev VM's devices; an empty /proc."""
    root = tree.materialize("dev-vm", tmp_path / "sys")
    tree.materialize("h100-host", root)
    tree.set_driver(root, GPU, "nvidia")
    proc = tmp_path / "proc"
    proc.mkdir()
    return root, proc


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def host(root, proc) -> VfioHost:
    return VfioHost(root, proc, PciIds(search=()))


def test_bind_dry_run_prints_and_changes_nothing(host_tree, capsys):
    root, proc = host_tree
    shutil.rmtree(root / "bus/pci/drivers/vfio-pci")  # module not loaded yet
    before = snapshot(root)
    assert main(["vfio", "bind", "0:6.0", "--sysfs", str(root), "--proc", str(proc)]) == 0
    out = capsys.readouterr().out
    assert f"would write: echo vfio-pci > {root}/bus/pci/devices/{GPU}/driver_override" in out
    assert f"would write: echo {GPU} > {root}/bus/pci/drivers/nvidia/unbind" in out
    assert f"would write: echo {GPU} > {root}/bus/pci/drivers_probe" in out
    assert "add --yes" in out and "vfio-pci driver is not loaded" in out
    assert snapshot(root) == before


def test_bind_yes_touches_only_the_named_device(host_tree, capsys):
    root, proc = host_tree
    before = snapshot(root)
    assert main(["vfio", "bind", GPU, "--yes", "--sysfs", str(root), "--proc", str(proc)]) == 0
    after = snapshot(root)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {f"bus/pci/devices/{GPU}/driver_override", "bus/pci/drivers/nvidia/unbind",
                       "bus/pci/drivers_probe"}
    assert after[f"bus/pci/devices/{GPU}/driver_override"] == b"vfio-pci"
    assert after["bus/pci/drivers/nvidia/unbind"] == GPU.encode()
    assert after["bus/pci/drivers_probe"] == GPU.encode()


def test_bind_refuses_gpu_with_open_nvidia_handles(host_tree):
    root, proc = host_tree
    tree.open_fd(proc, 4242, 7, "/dev/nvidia0")
    tree.open_fd(proc, 4243, 3, "/dev/null")
    before = snapshot(root)
    with pytest.raises(VfioError, match=r"refusing.*/dev/nvidia0 is open by pid 4242"):
        host(root, proc).plan_bind(GPU)
    assert main(["vfio", "bind", GPU, "--yes", "--sysfs", str(root), "--proc", str(proc)]) == 1
    assert snapshot(root) == before


def test_bind_refuses_when_open_files_cannot_be_checked(host_tree, monkeypatch):
    root, proc = host_tree
    (proc / "31337" / "fd").mkdir(parents=True)
    real_iterdir = Path.iterdir

    def iterdir(self):  # what a non-root user meets on another user's /proc/PID/fd
        if self == proc / "31337" / "fd":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(VfioError, match="cannot see the open files of 1 processes.*run as root"):
        host(root, proc).plan_bind(GPU)


def test_bind_refuses_open_drm_card_and_boot_vga(host_tree):
    root, proc = host_tree
    tree.set_driver(root, GPU, "nouveau")
    (root / f"bus/pci/devices/{GPU}/drm/card1").mkdir(parents=True)
    tree.open_fd(proc, 77, 12, "/dev/dri/card1")
    (root / f"bus/pci/devices/{GPU}/boot_vga").write_text("1\n")
    with pytest.raises(VfioError) as err:
        host(root, proc).plan_bind(GPU)
    assert "/dev/dri/card1 is open by pid 77" in str(err.value) and "boot VGA" in str(err.value)


def test_bind_refuses_device_serving_the_host(tmp_path):
    root = tree.materialize("dev-vm", tmp_path / "sys")  # virtio-net at 00:03.0, with net/eth0
    (root / "kernel/iommu_groups/9/devices").mkdir(parents=True)
    (root / "bus/pci/devices/0000:00:03.0/iommu_group").symlink_to("../../../kernel/iommu_groups/9")
    with pytest.raises(VfioError, match="serves the host: net eth0"):
        host(root, tmp_path).plan_bind("0000:00:03.0")


def test_bind_refuses_a_bridge(tmp_path):
    root = tree.materialize("qemu-edu", tmp_path / "sys")
    with pytest.raises(VfioError, match="0000:00:02.0 is a PCI bridge"):
        host(root, tmp_path).plan_bind("0000:00:02.0")


def test_bind_needs_an_iommu_group(tmp_path):
    root = tree.materialize("h100-guest", tmp_path / "sys")
    with pytest.raises(VfioError, match="no IOMMU group.*intel_iommu=on"):
        host(root, tmp_path).plan_bind(GPU)


def test_bind_lists_group_members_that_must_follow(tmp_path):
    root = tree.materialize("qemu-edu", tmp_path / "sys")
    tree.add_driver(root, "vfio-pci")
    plan = host(root, tmp_path).plan_bind("0000:00:1f.3")
    assert plan.others == ["0000:00:1f.0 (no driver)", "0000:00:1f.2 (no driver)"]
    assert [w.path.name for w in plan.writes] == ["driver_override", "drivers_probe"]  # no driver: no unbind


def test_bind_lists_the_uart_sharing_the_group_but_not_the_bridge(tmp_path):
    root = tree.materialize("qemu-edu", tmp_path / "sys")
    plan = host(root, tmp_path).plan_bind("0000:02:01.0")
    assert plan.others == ["0000:02:02.0 (serial)"]
    report = host(root, tmp_path).check("0000:02:01.0")
    assert report.problems == ["group member 0000:02:02.0 is bound to serial: it must be bound to vfio-pci too"]


def test_already_bound_is_a_no_op(tmp_path):
    root = tree.materialize("qemu-edu", tmp_path / "sys")
    plan = host(root, tmp_path).plan_bind("0000:00:01.0")
    assert plan.writes == [] and "already bound" in plan.notes[0]


def test_unbind_gives_device_back(tmp_path, capsys):
    root = tree.materialize("h100-host", tmp_path / "sys")
    proc = tmp_path / "proc"
    proc.mkdir()
    assert main(["vfio", "unbind", GPU, "--yes", "--sysfs", str(root), "--proc", str(proc)]) == 0
    assert (root / "bus/pci/drivers/vfio-pci/unbind").read_text() == GPU
    assert (root / f"bus/pci/devices/{GPU}/driver_override").read_text() == "\n"
    assert (root / "bus/pci/drivers_probe").read_text() == GPU


def test_unbind_refuses_while_vfio_group_is_open(tmp_path):
    root = tree.materialize("h100-host", tmp_path / "sys")
    tree.open_fd(tmp_path / "proc", 999, 5, "/dev/vfio/12")
    with pytest.raises(VfioError, match="/dev/vfio/12 is open by pid 999"):
        host(root, tmp_path / "proc").plan_unbind(GPU)


def test_check_ready_gpu(tmp_path, capsys):
    root = tree.materialize("h100-host", tmp_path / "sys")
    tree.add_driver(root, "vfio-pci")
    report = host(root, tmp_path).check(GPU)
    assert report.iommu_enabled and report.group_members == {GPU: "vfio-pci"}
    assert report.problems == [] and report.mmio_window == 256 * GiB
    assert main(["vfio", "check", GPU, "--sysfs", str(root), "--proc", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "BAR2 128 GiB (64-bit, prefetchable)" in out and "pci-hole64-size=274877906944" in out
    assert "ready for VFIO" in out


def test_check_reports_problems(tmp_path, capsys):
    root = tree.materialize("dev-vm", tmp_path / "sys")
    assert main(["vfio", "check", "0000:00:02.0", "--sysfs", str(root), "--proc", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "IOMMU: OFF" in out and "serves the host: block vda" in out and "intel_iommu=on" in out


def test_qemu_args_for_bound_gpu(tmp_path, capsys):
    root = tree.materialize("h100-host", tmp_path / "sys")
    assert qemu_vfio_args("0:6.0", root) == ["-global", "q35-pcihost.pci-hole64-size=274877906944",
                                             "-device", f"vfio-pci,host={GPU}"]
    assert main(["vfio", "qemu-args", GPU, "--sysfs", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"-device vfio-pci,host={GPU}")


def test_qemu_args_refuse_unbound_gpu(tmp_path):
    root = tree.materialize("h100-guest", tmp_path / "sys")
    with pytest.raises(VfioError, match="bound to nvidia.*ukgpu vfio bind"):
        qemu_vfio_args(GPU, root)
    assert qemu_vfio_args(GPU, root, require_bound=False)[-1] == f"vfio-pci,host={GPU}"


@pytest.mark.parametrize("sizes,want", [
    ([16 * MiB, 128 * GiB, 32 * MiB], 256 * GiB),  # H100
    ([MiB], 4 * GiB),                               # small devices keep QEMU's minimum
    ([3 * GiB], 8 * GiB),                           # odd sizes round up, then double
    ([32 * GiB, 32 * GiB, 16 * MiB], 128 * GiB),    # sum above a power of two
])
def test_mmio_window_size(sizes, want):
    bars = [Bar(i, 0, s, False, True, True) for i, s in enumerate(sizes)]
    assert mmio_window_size(bars) == want


def test_pci_command_lists_gpu_first(host_tree, capsys):
    root, _ = host_tree
    assert main(["pci", "--sysfs", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{GPU}  10de:2330  class 030200")
    assert "[NVIDIA GPU]" in out and "PCIe link 32 GT/s x16" in out and "resizable BAR2: now 131072 MiB" in out
    assert main(["pci", "--json", "--gpus", "--sysfs", str(root)]) == 0
    (gpu,) = json.loads(capsys.readouterr().out)
    assert gpu["bdf"] == GPU and gpu["driver"] == "nvidia" and gpu["bars"][1]["size"] == 128 * GiB


def test_probe_explains_missing_vfio(tmp_path, capsys):
    root = tree.materialize("h100-host", tmp_path / "sys")
    assert main(["vfio", "probe", GPU, "--sysfs", str(root), "--dev", str(tmp_path / "dev")]) == 1
    assert "modprobe vfio-pci" in capsys.readouterr().err
    root2 = tree.materialize("dev-vm", tmp_path / "sys2")
    assert main(["vfio", "probe", "0:1.0", "--sysfs", str(root2), "--dev", str(tmp_path / "dev")]) == 1
    assert "intel_iommu=on" in capsys.readouterr().err
