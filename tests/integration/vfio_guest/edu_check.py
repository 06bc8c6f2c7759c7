"""Exercise QEMU's edu device through `ukgpu.gpu.vfio.device` (runs inside the test guest).

edu registers (BAR0): 0x00 id, 0x04 liveness (reads back inverted), 0x24 IRQ
status, 0x60 raise IRQ, 0x64 acknowledge IRQ, 0x80 DMA source, 0x88 DMA
destination, 0x90 DMA count, 0x98 DMA command (bit 0 start, bit 1 edu->RAM,
bit 2 IRQ when done).  Its DMA buffer sits at 0x40000 in the device, 4 KiB.
Each step records facts in the result dict; a failing step records its error
and the run goes on, so the host test sees every failure at once.
"""

import argparse
import contextlib
import io
import os
import time

from ukgpu.gpu.vfio import abi
from ukgpu.gpu.vfio.device import VfioError, describe, open_device

REG_ID, REG_LIVENESS, REG_IRQ_STATUS, REG_IRQ_RAISE, REG_IRQ_ACK = 0x00, 0x04, 0x24, 0x60, 0x64
REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_START, DMA_TO_RAM = 0x1, 0x2
EDU_BUFFER = 0x40000
DMA_BYTES = 2048  # under 4096: QEMU 7.2's edu aborts on a DMA ending at its buffer's end
IOVA_SRC, IOVA_DST, IOVA_UNMAPPED = 0x100000, 0x200000, 0x700000  # edu's DMA mask is 28 bits


def dma(bar, src: int, dst: int, count: int, to_ram: bool, timeout: float = 5.0) -> float:
    """Run one edu DMA and wait for its command register to clear; returns seconds taken."""
    bar.write64(REG_DMA_SRC, src)
    bar.write64(REG_DMA_DST, dst)
    bar.write64(REG_DMA_COUNT, count)
    t0 = time.monotonic()
    bar.write64(REG_DMA_CMD, DMA_START | (DMA_TO_RAM if to_ram else 0))
    while bar.read64(REG_DMA_CMD) & DMA_START:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"edu DMA did not complete in {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - t0


def dmar_faults() -> list[str]:
    """DMAR fault lines the guest kernel has logged so far."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    lines = []
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten; keep reading
                continue
            if "DMAR" in record and "fault" in record.lower():
                lines.append(record.split(";", 1)[-1].strip())
    finally:
        os.close(fd)
    return lines


def step(result: dict, name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:
        result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"


def run(bdf: str) -> dict:
    r: dict = {"bdf": bdf}
    fds_before = set(os.listdir("/proc/self/fd"))
    with open_device(bdf) as s:
        dev, bar = s.device, None
        r["api_version"] = s.container.api_version
        r["type1v2"] = s.container.check_extension(abi.VFIO_TYPE1v2_IOMMU)
        r["iommu_pgsizes"] = s.container.iommu_pgsizes()
        r["device_flags"], r["num_regions"], r["num_irqs"] = dev.flags, dev.num_regions, dev.num_irqs
        r["is_pci"] = dev.is_pci
        r["describe"] = describe(s)
        bar0 = dev.region_info(abi.VFIO_PCI_BAR0_REGION_INDEX)
        r["bar0"] = {"size": bar0.size, "offset": bar0.offset, "mmap": bar0.mmappable}
        r["config_ids"] = [dev.config_read(0x00, 2), dev.config_read(0x02, 2)]
        bar = dev.map_bar(0)
        r["id_register"] = bar.read32(REG_ID)

        def liveness():
            values = [0x12345678, 0xDEADBEEF, 0x0, 0xFFFFFFFF]
            got = []
            for v in values:
                bar.write32(REG_LIVENESS, v)
                got.append(bar.read32(REG_LIVENESS))
            r["liveness"] = {"wrote": values, "read": got}

        step(r, "liveness", liveness)

        def bus_master():
            dev.enable_bus_master()
            r["command_register"] = dev.config_read(0x04, 2)

        step(r, "bus_master", bus_master)
        step(r, "dma", lambda: _dma_checks(r, s.container, bar))
        step(r, "irq", lambda: _irq_check(r, dev, bar))
        step(r, "reset", lambda: _reset_check(r, dev))
    r["closed"] = True
    r["leaked_fds"] = sorted(set(os.listdir("/proc/self/fd")) - fds_before)
    # A second session only works if the first released the group and container.
    with open_device(bdf) as again:
        r["reopen_id_register"] = again.device.map_bar(0).read32(REG_ID)
    step(r, "cli_probe", lambda: _cli_probe(r, bdf))
    return r


def _cli_probe(r: dict, bdf: str) -> None:
    """`ukgpu vfio probe BDF`'s handler, on the real device."""
    from ukgpu.tools.commands import vfio as cmd_vfio

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cmd_vfio._probe(argparse.Namespace(bdf=bdf, json=False, sysfs="/sys", dev="/dev/vfio"))
    r["cli_probe"] = {"code": code, "text": out.getvalue()}


def _dma_checks(r: dict, container, bar) -> None:
    src = container.map_dma(4096, IOVA_SRC)
    dst = container.map_dma(4096, IOVA_DST)
    try:
        container.map_dma(4096, IOVA_SRC)
        r["double_map"] = "accepted"
    except VfioError as exc:
        r["double_map"] = str(exc)
    pattern = os.urandom(DMA_BYTES)
    src.view[:DMA_BYTES] = pattern
    dst.view[:] = b"\xaa" * 4096
    t_in = dma(bar, IOVA_SRC, EDU_BUFFER, DMA_BYTES, to_ram=False)
    t_out = dma(bar, EDU_BUFFER, IOVA_DST, DMA_BYTES, to_ram=True)
    r["dma_roundtrip_ok"] = bytes(dst.view[:DMA_BYTES]) == pattern
    r["dma_tail_untouched"] = bytes(dst.view[DMA_BYTES:]) == b"\xaa" * (4096 - DMA_BYTES)
    r["dma_seconds"] = [round(t_in, 3), round(t_out, 3)]

    # edu -> an IOVA nobody mapped: must fault, and no live buffer may change.
    faults_before = len(dmar_faults())
    dst.view[:] = b"\x55" * 4096
    src_before = bytes(src.view)
    dma(bar, EDU_BUFFER, IOVA_UNMAPPED, DMA_BYTES, to_ram=True)
    # Unmapping dst takes the device's access away: a DMA to its old IOVA faults too.
    r["unmapped_bytes"] = container.unmap_dma(dst)
    dma(bar, EDU_BUFFER, IOVA_DST, DMA_BYTES, to_ram=True)
    r["unmapped_dma_no_corruption"] = bytes(src.view) == src_before
    time.sleep(0.2)  # the fault interrupt is reported asynchronously
    faults = dmar_faults()
    r["dmar_faults_new"] = len(faults) - faults_before
    r["dmar_fault_lines"] = faults[-4:]


def _irq_check(r: dict, dev, bar) -> None:
    irq = dev.irq_eventfd(abi.VFIO_PCI_MSI_IRQ_INDEX)
    before = irq.wait(0)
    bar.write32(REG_IRQ_RAISE, 0x1)
    t0 = time.monotonic()
    fired = irq.wait(5.0)
    r["msi"] = {"stale": before, "fired": fired, "latency_s": round(time.monotonic() - t0, 4),
                "status": bar.read32(REG_IRQ_STATUS)}
    bar.write32(REG_IRQ_ACK, 0x1)
    r["msi"]["status_after_ack"] = bar.read32(REG_IRQ_STATUS)


def _reset_check(r: dict, dev) -> None:
    if not dev.flags & abi.VFIO_DEVICE_FLAGS_RESET:
        r["reset"] = "unsupported"
        return
    dev.reset()
    r["reset"] = "ok"
