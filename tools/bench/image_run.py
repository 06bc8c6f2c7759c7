"""Boot-to-READY of a built image: host wall time to the READY line, and the guest's own step times."""

from __future__ import annotations

import sys
from pathlib import Path

from ukgpu.tools.bench.schema import Entry, Result


def bench_image(image_dir: Path, repeats: int, timeout_s: float = 600.0) -> Entry:
    try:
        from ukgpu.kernel.image import build as image
        from ukgpu.kernel.image import qemu
    except ImportError as exc:
        return Entry.unavailable("-", "image", "image", f"the image tools cannot be imported ({exc})")
    from ukgpu.llama_core.errors import UkgpuError

    try:
        img = image.load(image_dir)
    except UkgpuError as exc:
        return Entry.unavailable("-", "image", "image", str(exc))
    readies: list[dict[str, float]] = []
    for i in range(repeats):
        print(f"ukgpu bench: booting {image_dir} ({i + 1}/{repeats})", file=sys.stderr, flush=True)
        try:
            with qemu.Vm(img, qemu.BootOptions(port=0)) as vm:
                readies.append(vm.wait_ready(timeout_s))
        except UkgpuError as exc:
            first = str(exc).splitlines()[0]
            return Entry.unavailable("-", "image", "image", f"boot {i + 1} failed: {first}")
    results = [Result.of("boot_to_ready", "s", [r["host_seconds"] for r in readies])]
    steps = [k for k in readies[0] if k not in ("host_seconds", "port")]
    results += [Result.of(f"guest_{k}", "s", [r[k] for r in readies if k in r]) for k in steps]
    info = {"image": str(image_dir), "accel": "tcg"}
    try:
        restores = _restores(img, repeats, timeout_s)
    except UkgpuError as exc:
        info["restore"] = f"failed: {str(exc).splitlines()[0]}"
    else:
        if restores:
            results.append(Result.of("restore_to_ready", "s", restores))
            info["restore"] = "from the snapshot `ukgpu image snapshot` took"
    return Entry("-", "image", "image", True, None, results, info)


def _restores(img, repeats: int, timeout_s: float) -> list[float]:
    """Host seconds from `Vm` (the host's checks included) to READY, restoring the image's
    snapshot for the default options; none when no snapshot was taken."""
    import time

    from ukgpu.kernel.image import qemu, snapshot

    saved = snapshot.find(img, qemu.BootOptions(port=0))
    out: list[float] = []
    for i in range(repeats if saved is not None else 0):
        print(f"ukgpu bench: restoring {saved.state} ({i + 1}/{repeats})", file=sys.stderr, flush=True)
        start = time.monotonic()
        with qemu.Vm(img, qemu.BootOptions(port=0), restore=saved) as vm:
            vm.wait_ready(timeout_s)
            out.append(time.monotonic() - start)
    return out
