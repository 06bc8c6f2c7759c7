"""Snapshots: READY in the time it takes QEMU to load a guest's memory, not to boot it.

    ukgpu image snapshot DIR      # boot once, warm up, save the VM's state; recorded on this host
    ukgpu boot DIR                # restores that state when the options match (--cold: boot anyway)

A cold boot under emulation spends most of its time in Python (imports, the model's load, the HTTP
stack), the same work every time.  `take` boots the image the verified way (kernel/image/trust.py),
waits for READY, runs one completion (the kernels' machine code is then loaded), asks the guest to
seal itself (kernel/guest/resume.py), pauses the VM and saves its state (QEMU's migration stream:
pages of zeros take no room).  A restore starts QEMU paused, streams that file into it, and only
runs it once every byte has matched the host's record; the guest then takes its own wall clock,
fresh entropy for its kernel's generator and the API key from the host over the console, and says
READY.

Integrity: the state holds the guest's memory, verified code and data included, so it is pinned
like the boot files: the host's record (under `<ukgpu cache>/trusted/snapshots/`, outside every
image folder) keeps the SHA-256 of each 4 MiB piece, and each piece is checked before QEMU reads it
(no byte QEMU parses is unchecked, no window to swap the file).  The disks stay dm-verity mappings
whose root hashes are in that verified memory, so blocks read after the restore are checked as
before.  A snapshot depends on everything the saved machine was made of: the image (its digest),
QEMU's version, the accelerator, RAM, CPUs and the guest's command line words; it is found by the
hash of those (`settings`), so any change boots cold instead.  A GPU passed through (VFIO) cannot
be saved: such boots are always cold.  An API key is never part of a snapshot: each restore
brings its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from ukgpu.kernel.guest import resume as guest_resume
from ukgpu.kernel.image import qemu, trust
from ukgpu.kernel.image.build import Image
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.models.registry import cache_dir

CHUNK = 4 << 20
WARM_PROMPT = "0 1 2 3"  # shares no prefix with real prompts: a restore starts with nothing cached that helps


class SnapshotError(UkgpuError):
    """A snapshot that cannot be taken with these options, or failed to save."""


def states_dir() -> Path:
    return cache_dir() / "snapshots"


def records_dir() -> Path:
    return trust.trust_dir() / "snapshots"


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SnapshotError(f"{binary} --version failed: {exc}") from None
    return out.stdout.splitlines()[0].strip() if out.stdout else ""


def settings(image: Image, opts: qemu.BootOptions) -> dict | None:
    """What a saved state depends on, or None when these options cannot use one (a GPU, or a boot
    without the host's record)."""
    if opts.gpu or not opts.verify:
        return None
    return {"image": trust.digest_of(trust.record_of(image.info)), "qemu": qemu_version(opts.qemu),
            "accel": opts.accel, "cpus": opts.cpus, "mem": opts.mem or f"{qemu.default_mem_mib(image)}M",
            "arena": opts.arena, "append": list(opts.append), "extra_args": list(opts.extra_args)}


def key_of(found: dict) -> str:
    return hashlib.sha256(json.dumps(found, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def find(image: Image, opts: qemu.BootOptions) -> qemu.Restore | None:
    """The recorded snapshot for this image and these options, if one was taken on this host."""
    found = settings(image, opts)
    if found is None:
        return None
    key = key_of(found)
    try:
        record = json.loads((records_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    state = states_dir() / f"{key}.state"
    if record.get("settings") != found or not state.is_file():
        return None
    return qemu.Restore(state, record["chunk"], tuple(record["chunks"]), found["image"])


def chunk_digests(path: Path, chunk: int = CHUNK) -> list[str]:
    """SHA-256 of each piece, as the restore checks them (`trust.read_pieces`)."""
    return [hashlib.sha256(piece).hexdigest() for piece in trust.read_pieces(path, chunk)]


def take(image: Image, opts: qemu.BootOptions, log=print, timeout: float = 900.0) -> qemu.Restore:
    """Boot `image` cold with `opts` (its API key aside), warm it up, save its state and record it."""
    import httpx

    if opts.api_key:
        raise SnapshotError("a snapshot never holds an API key: take it without one; each "
                            "`ukgpu boot --api-key-file` restore then brings its own")
    found = settings(image, opts)
    if found is None:
        raise SnapshotError("a guest with a GPU passed through, or booted without the host's record "
                            "(--insecure-skip-verify), cannot be snapshotted")
    key = key_of(found)
    states_dir().mkdir(parents=True, exist_ok=True)
    partial = states_dir() / f".{key}.{os.getpid()}.partial"
    with qemu.Vm(image, replace(opts, port=0), on_line=None) as vm:
        ready = vm.wait_ready(timeout)
        log(f"snapshot: cold boot READY after {ready['host_seconds']:.1f}s; warming up")
        body = {"model": image.info["model"]["name"], "prompt": WARM_PROMPT, "max_tokens": 2,
                "temperature": 0}
        httpx.post(vm.url + "/v1/completions", json=body, timeout=timeout).raise_for_status()
        vm.send("snapshot")
        vm.wait_line(guest_resume.SNAPSHOT_READY, 60)
        start = time.monotonic()
        try:
            _save(vm, partial, timeout)
            chunks = chunk_digests(partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            vm.kill()
    state = states_dir() / f"{key}.state"
    partial.chmod(0o400)
    partial.replace(state)
    trust.write_record(records_dir(), key, {"settings": found, "chunk": CHUNK, "chunks": chunks,
                                            "size": state.stat().st_size, "taken": int(time.time())})
    log(f"snapshot: saved {state.stat().st_size / (1 << 20):.0f} MiB in {time.monotonic() - start:.1f}s "
        f"to {state}")
    return qemu.Restore(state, CHUNK, tuple(chunks), found["image"])


def _save(vm: qemu.Vm, path: Path, timeout: float) -> None:
    """Pause the VM and write its state to `path` (QEMU's migration stream)."""
    qemu.qmp(vm.qmp_path, "stop",
             {"execute": "migrate", "arguments": {"uri": f"exec:cat > {shlex.quote(str(path))}"}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = qemu.qmp(vm.qmp_path, "query-migrate")[0]
        if status.get("status") == "completed":
            return
        if status.get("status") in ("failed", "cancelled"):
            raise SnapshotError(f"QEMU could not save the guest: {status.get('error-desc', status)}")
        time.sleep(0.1)
    raise SnapshotError(f"QEMU did not save the guest within {timeout:.0f}s")


def drop(image: Image, opts: qemu.BootOptions) -> bool:
    """Remove the snapshot for these options and its record; whether there was one."""
    found = settings(image, opts)
    if found is None:
        return False
    key = key_of(found)
    had = False
    for path in (records_dir() / f"{key}.json", states_dir() / f"{key}.state"):
        if path.exists():
            path.unlink()
            had = True
    return had
