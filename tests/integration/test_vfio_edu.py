"""ukgpu.gpu.vfio.device against real VFIO ioctls: QEMU's edu device behind an emulated intel-iommu.

One TCG guest boot (q35 + intel-iommu + edu) runs `vfio_guest/edu_check.py`
inside a Debian kernel; the tests below check what it reports.  Every failure
message carries the guest's serial log.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def _load_guest_builder():
    """vfio_guest/build.py under a name of its own (a plain `import build` could find pypa's)."""
    spec = importlib.util.spec_from_file_location("ukgpu_vfio_guest_build",
                                                  Path(__file__).parent / "vfio_guest" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


guest_build = _load_guest_builder()

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESULT_PREFIX = "UKGPU_VFIO_RESULT "
BOOT_TIMEOUT_S = 150
EDU_ID = 0x010000ED


@dataclass
class GuestRun:
    result: dict
    log: str
    log_path: Path
    seconds: float

    def why(self, what: str) -> str:
        return f"{what}\nresult: {json.dumps(self.result, indent=1)}\nserial log ({self.log_path}):\n{self.log[-8000:]}"


def qemu_command(image: guest_build.GuestImage, extra_cmdline: str = "") -> list[str]:
    return ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024",
            "-device", "intel-iommu", "-device", "edu",
            # Behind a root port and a PCIe-to-PCI bridge, a second edu shares one IOMMU group with a
            # PCI UART that the kernel's built-in serial driver takes: a group that is not viable.
            "-device", "pcie-root-port,id=rp0,chassis=1,slot=1", "-device", "pcie-pci-bridge,id=br0,bus=rp0",
            "-device", "edu,bus=br0,addr=1", "-chardev", "null,id=nul",
            "-device", "pci-serial,bus=br0,addr=2,chardev=nul",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            # no_timer_check: on a loaded host the TCG guest can miss the kernel's IO-APIC timer test
            # and panic ("timer doesn't work through Interrupt-remapped IO-APIC") before /init.
            "-append", f"console=ttyS0 intel_iommu=on panic=-1 no_timer_check {extra_cmdline}".strip(),
            "-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot"]


@pytest.fixture(scope="module")
def image() -> guest_build.GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make host-deps` (apt-get install qemu-system-x86)")
    return guest_build.build()


@pytest.fixture(scope="module")
def guest(image, tmp_path_factory) -> GuestRun:
    return boot(image, tmp_path_factory.mktemp("vfio-edu") / "serial.log")


@pytest.fixture(scope="module")
def guest_no_intremap(image, tmp_path_factory) -> GuestRun:
    return boot(image, tmp_path_factory.mktemp("vfio-edu-nointremap") / "serial.log", "intremap=off")


def boot(image: guest_build.GuestImage, log_path: Path, extra_cmdline: str = "") -> GuestRun:
    """Boot once; boot again only if the first never reached the result line (a guest that ran
    the checks always prints it, whatever failed inside, so a real failure is never retried)."""
    first = _boot_once(image, log_path, extra_cmdline)
    if isinstance(first, GuestRun):
        return first
    second = _boot_once(image, log_path.with_name("serial-retry.log"), extra_cmdline)
    if isinstance(second, GuestRun):
        return second
    pytest.fail(f"the guest gave no result in two boots.\nfirst boot: {first}\nsecond boot: {second}")


def _boot_once(image: guest_build.GuestImage, log_path: Path, extra_cmdline: str) -> GuestRun | str:
    """The run, or why there was no result line (with the serial log's tail)."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(qemu_command(image, extra_cmdline), capture_output=True, text=True,
                              timeout=BOOT_TIMEOUT_S, errors="replace")
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        log, code = out.decode(errors="replace") if isinstance(out, bytes) else out, None
    log_path.write_text(log)
    print(f"guest serial log: {log_path}")
    lines = [line for line in log.splitlines() if line.startswith(RESULT_PREFIX)]
    if code != 0 or not lines:
        status = f"timed out after {BOOT_TIMEOUT_S} s" if code is None else f"QEMU exited {code}"
        return f"{status} with {'a' if lines else 'no'} result line; serial log ({log_path}):\n{log[-8000:]}"
    return GuestRun(json.loads(lines[-1][len(RESULT_PREFIX):]), log, log_path, time.monotonic() - t0)


def test_guest_ran_every_step(guest):
    r = guest.result
    assert "error" not in r, guest.why(f"the guest script failed: {r.get('error')}\n{r.get('traceback', '')}")
    assert "errors" not in r, guest.why(f"steps failed: {r.get('errors')}")
    assert r["closed"] is True, guest.why("the VFIO session did not close")


def test_session_releases_everything(guest):
    r = guest.result
    assert r.get("leaked_fds") == [], guest.why("file descriptors left open after the session closed")
    assert r.get("reopen_id_register") == EDU_ID, guest.why("a second session could not open the device")


def test_bind_through_driver_override(guest):
    r = guest.result
    bdf = r.get("bdf", "?")
    assert r.get("driver_after_bind") == "vfio-pci", guest.why("edu is not bound to vfio-pci")
    assert r["bind_writes"] == [f"echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override",
                                f"echo {bdf} > /sys/bus/pci/drivers_probe"], guest.why("unexpected bind plan")


def test_unbound_device_error_says_bind(guest):
    message = guest.result.get("error_before_bind", "")
    assert "is missing" in message and "ukgpu vfio bind" in message, guest.why("error before binding")


def test_unbind_gives_the_device_back(guest):
    r = guest.result
    bdf = r.get("bdf", "?")
    assert r.get("unbind_writes") == [f"echo {bdf} > /sys/bus/pci/drivers/vfio-pci/unbind",
                                      f"echo '' > /sys/bus/pci/devices/{bdf}/driver_override",
                                      f"echo {bdf} > /sys/bus/pci/drivers_probe"], guest.why("unbind plan")
    assert r.get("driver_after_unbind") is None, guest.why("edu still bound after unbind")
    assert r.get("group_file_after_unbind") is False, guest.why("/dev/vfio/N outlived the unbind")


def test_container_group_device(guest):
    r = guest.result
    assert r.get("api_version") == 0, guest.why("VFIO_GET_API_VERSION")
    assert r.get("type1v2") is True, guest.why("VFIO_CHECK_EXTENSION(TYPE1v2)")
    assert r.get("iommu_pgsizes", 0) & 0x1000, guest.why("4 KiB IOMMU pages missing")
    assert r.get("is_pci") is True and r.get("num_regions") == 9, guest.why("VFIO_DEVICE_GET_INFO")
    assert r.get("num_irqs", 0) >= 2, guest.why("edu has INTx and MSI")


def test_bar0_mmap_and_config_region(guest):
    r = guest.result
    assert r.get("bar0") == {"size": 1 << 20, "offset": 0, "mmap": True}, guest.why("BAR0 region info")
    assert r.get("config_ids") == [0x1234, 0x11E8], guest.why("config region vendor/device")
    assert r.get("id_register") == EDU_ID, guest.why(f"edu ID register is {r.get('id_register')!r}")


def test_describe_reports_regions_and_irqs(guest):
    d = guest.result.get("describe")
    assert d, guest.why("describe() did not run")
    regions = {r["name"]: (r["size"], r["flags"]) for r in d["regions"]}
    assert regions["BAR0"] == (1 << 20, "rwm") and regions["BAR1"] == (0, ""), guest.why("BAR regions")
    assert regions["config"][0] in (256, 4096) and regions["config"][1] == "rw", guest.why("config region")
    assert regions["VGA"] == (None, ""), guest.why("edu is no VGA device")
    assert d["irqs"] == {"INTx": 1, "MSI": 1, "MSI-X": 0, "ERR": None, "REQ": 1}, guest.why("IRQ counts")
    assert (d["vendor_id"], d["device_id"], d["bar0_reg0"]) == (0x1234, 0x11E8, EDU_ID), guest.why("ids")


def test_cli_probe_prints_the_device(guest):
    probe = guest.result.get("cli_probe")
    assert probe and probe["code"] == 0, guest.why("`ukgpu vfio probe` failed")
    lines = [line.strip() for line in probe["text"].splitlines()]
    assert lines[0].startswith(f"{guest.result['bdf']}  1234:11e8  VFIO API 0"), guest.why("probe header")
    assert any(line.split()[:4] == ["region", "0", "BAR0", "1"] and line.split()[-1] == "rwm" for line in lines), \
        guest.why("probe BAR0 line")
    assert "BAR0[0x0] = 0x010000ed" in lines, guest.why("probe BAR0 register")


def test_liveness_register_inverts(guest):
    live = guest.result.get("liveness")
    assert live, guest.why("no liveness result")
    assert live["read"] == [~v & 0xFFFFFFFF for v in live["wrote"]], guest.why("liveness readback")


def test_bus_master_enabled_through_config_region(guest):
    assert guest.result.get("command_register", 0) & 0x4, guest.why("bus master bit not set")


def test_dma_round_trip_through_mapped_iovas(guest):
    r = guest.result
    assert r.get("dma_roundtrip_ok") is True, guest.why("RAM -> edu -> RAM did not return the pattern")
    assert r.get("dma_tail_untouched") is True, guest.why("DMA wrote past its count")


def test_mapping_an_iova_twice_is_refused(guest):
    assert "already mapped" in guest.result.get("double_map", ""), guest.why("second MAP_DMA of one IOVA")


def test_dma_to_unmapped_iova_is_blocked(guest):
    r = guest.result
    assert r.get("unmapped_bytes") == 4096, guest.why("VFIO_IOMMU_UNMAP_DMA size")
    assert r.get("unmapped_dma_no_corruption") is True, guest.why("a live buffer changed")
    assert r.get("dmar_faults_new", 0) >= 2, guest.why("expected DMAR faults for both blocked DMAs")
    for iova in ("0x700000", "0x200000"):
        assert any(f"fault addr {iova}" in line for line in guest.log.splitlines()), \
            guest.why(f"no DMAR fault for IOVA {iova} in the serial log")


def test_msi_reaches_eventfd(guest):
    msi = guest.result.get("msi")
    assert msi, guest.why("no MSI result")
    assert msi["stale"] == 0 and msi["fired"] >= 1, guest.why("the MSI eventfd did not fire")
    assert msi["status"] & 1 and msi["status_after_ack"] == 0, guest.why("edu IRQ status/ack")


def test_boot_is_quick(guest):
    assert guest.seconds < 60, guest.why(f"boot + checks took {guest.seconds:.1f} s")


def test_group_with_a_host_driver_is_not_viable(guest):
    nv = guest.result.get("not_viable")
    assert nv, guest.why("no not-viable check ran")
    serial = [o for o in nv["others"] if o.endswith("(serial)")]
    assert len(serial) == 1, guest.why("bind did not list the UART that shares the group")
    uart = serial[0].split()[0]
    assert "is not viable" in nv["error"] and f"{uart} is bound to serial" in nv["error"], \
        guest.why("opening a device of a non-viable group")


def test_no_interrupt_remapping_error_says_so(guest_no_intremap):
    message = guest_no_intremap.result.get("no_intremap_error", "")
    assert "EPERM" in message and "interrupt remapping" in message, \
        guest_no_intremap.why("VFIO_SET_IOMMU without interrupt remapping")
