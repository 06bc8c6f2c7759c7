"""Measure an image under QEMU against the floor: the same kernel booting a busybox initramfs.

    python -m ukgpu.kernel.image.bench [-m MODEL] [--runs 3] [--accel tcg] [--restore]

Prints a Markdown table: image size breakdown, then per run the floor boot
(QEMU start to a busybox `/init` printing a line), the image's boot to READY
(host wall clock and the guest's own step times), the time to first token of
one greedy completion over HTTP (`ttft`: 5-token prompt, 1 token) and a
4-token completion (`tokens4`).  `--restore` also takes a snapshot of the image
(kernel/image/snapshot.py) and, in each run, restores it: READY, ttft and tokens4 the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

from ukgpu.kernel.image import build as image
from ukgpu.kernel.image import debs, qemu
from ukgpu.kernel.image.initramfs import Initramfs

FLOOR_INIT = b"#!/bin/sh\n/bin/busybox echo FLOOR-READY\n/bin/busybox poweroff -f\n"


def floor_initramfs(out: Path) -> Path:
    (bb,) = debs.fetch(["busybox-static"])
    cpio = Initramfs()
    cpio.add_file("/bin/busybox", source=bb / "bin" / "busybox")
    cpio.add_symlink("/bin/sh", "busybox")
    cpio.add_node("/dev/console", "c", 5, 1)
    cpio.add_file("/init", data=FLOOR_INIT, mode=0o755)
    cpio.write(out)
    return out


def floor_boot(vmlinux: Path, initrd: Path, accel: str) -> float:
    """Seconds from QEMU start to the floor's FLOOR-READY line."""
    opts = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    cmd = ["qemu-system-x86_64", "-M", "q35", *opts, "-m", "512", "-nodefaults",
           "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
           "-kernel", str(vmlinux), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 quiet"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    seen = None
    for line in proc.stdout:
        if b"FLOOR-READY" in line and seen is None:
            seen = time.monotonic() - start
    proc.wait(60)
    if seen is None:
        raise RuntimeError("the floor initramfs never printed FLOOR-READY")
    return seen


def image_boot(built: image.Image, accel: str, unverified: bool = False,
               restore: qemu.Restore | None = None) -> dict[str, float]:
    """READY timings, `host_check` (the host hashing and copying the boot files against its record,
    before QEMU starts), ttft and tokens4.  unverified: `--insecure-skip-verify` (no host record,
    the disks mapped without dm-verity): what the block checks cost, by difference.  restore: start
    from that snapshot (its check is part of `host_seconds`)."""
    import httpx

    start = time.monotonic()
    vm = qemu.Vm(built, qemu.BootOptions(port=0, accel=accel, verify=not unverified), restore=restore)
    host_check = 0.0 if unverified else time.monotonic() - start
    with vm:
        ready = dict(vm.wait_ready(900))
        ready["host_check"] = host_check
        ready["host_seconds"] += host_check
        body = {"model": built.info["model"]["name"], "prompt": "The capital of France is",
                "max_tokens": 1, "temperature": 0}
        start = time.monotonic()
        resp = httpx.post(vm.url + "/v1/completions", json=body, timeout=900)
        resp.raise_for_status()
        ready["ttft"] = time.monotonic() - start
        start = time.monotonic()
        body["max_tokens"] = 4
        resp = httpx.post(vm.url + "/v1/completions", json=body, timeout=900)
        resp.raise_for_status()
        ready["tokens4"] = time.monotonic() - start
        vm.poweroff(60)
    return ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=image.DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--no-numba", dest="numba", action="store_false")
    parser.add_argument("--compare-unverified", action="store_true",
                        help="also boot each run without dm-verity (--insecure-skip-verify): the checks' cost")
    parser.add_argument("--restore", action="store_true",
                        help="also restore a snapshot of the image in each run (taken once first)")
    args = parser.parse_args()
    built = image.build(image.BuildConfig(model=args.model, numba=args.numba), log=lambda m: None)
    print(f"load average before: {os.getloadavg()}")
    print(image.breakdown(built.info))
    floor_cpio = floor_initramfs(built.dir.parent / "floor.cpio")
    saved = None
    if args.restore:
        from ukgpu.kernel.image import snapshot

        saved = snapshot.take(built, qemu.BootOptions(port=0, accel=args.accel))
        print(f"snapshot: {saved.state.stat().st_size / (1 << 20):.0f} MiB", flush=True)
    rows, restored = [], []
    for run in range(args.runs):
        floor = floor_boot(built.dir / "vmlinux", floor_cpio, args.accel)
        got = image_boot(built, args.accel)
        rows.append({"floor": floor, **got})
        print(f"run {run + 1}: " + " ".join(f"{k}={v:.2f}" for k, v in rows[-1].items()),
              flush=True)
        if saved is not None:
            again = image_boot(built, args.accel, restore=saved)
            restored.append({"floor": floor, **again, "ready_over_floor": again["host_seconds"] / floor})
            print(f"run {run + 1} (restored): " + " ".join(f"{k}={v:.2f}" for k, v in restored[-1].items()),
                  flush=True)
        if args.compare_unverified:
            plain = image_boot(built, args.accel, unverified=True)
            print(f"run {run + 1} (unverified): " + " ".join(f"{k}={v:.2f}" for k, v in plain.items()),
                  flush=True)
    keys = ["floor", "host_check", "host_seconds", "boot_to_init", "root", "python_start", "verify",
            "modules", "network", "model_load", "http", "total", "ttft", "tokens4"]
    print(f"load average after: {os.getloadavg()}")
    rows = [dict(r, ready_over_floor=r["host_seconds"] / r["floor"]) for r in rows]
    keys.append("ready_over_floor")
    _table(rows, keys)
    if restored:
        print("\nrestored from the snapshot:")
        _table(restored, ["floor", "host_seconds", "resume", "ready_over_floor", "ttft", "tokens4"])


def _table(rows: list[dict[str, float]], keys: list[str]) -> None:
    print("\n| measure (s) | median | min | max |\n|---|---|---|---|")
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            print(f"| {key} | {statistics.median(values):.2f} | {min(values):.2f} | "
                  f"{max(values):.2f} |")


if __name__ == "__main__":
    main()
