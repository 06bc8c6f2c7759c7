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
    return Entry("-", "image", "image", True, None, results, {"image": str(image_dir), "accel": "tcg"})
