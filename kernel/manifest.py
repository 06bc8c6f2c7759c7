"""The image manifest: what is in an image, pinned by a digest on the kernel command line.

`/etc/ukgpu/manifest.json` on the image's root filesystem lists every regular file with its size
and sha256, the symlinks, the insmod order of the kernel modules, the model, the build inputs and
a size breakdown.  The host keeps a copy next to the image and puts the manifest's own sha256 on
the kernel command line (`ukgpu.manifest=<hex>`); the guest refuses a manifest with another digest.

The bytes themselves are checked by the kernel, not by this module: the root filesystem sits on a
dm-verity disk whose root hash is on the same command line (kernel/guest/stage1.py), so each
block is checked as it is read and nothing is hashed whole before serving.

Guest-side code: standard library only.

API
---
`sha256_file(path) -> str`, `digests(path) -> {"sha256", "size"}` (one read)
`dumps(manifest) -> bytes`               canonical JSON (sorted keys): same input, same bytes
`load(path, expected_sha256) -> dict`    raises ManifestError on a digest mismatch
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ukgpu.llama_core.errors import UkgpuError

FORMAT = "ukgpu-image/2"
GUEST_PATH = "/etc/ukgpu/manifest.json"
# Created at run time or by the kernel, never part of the image contents.
RUNTIME_DIRS = ("/proc", "/sys", "/dev", "/tmp", "/run")
_CHUNK = 1 << 20


class ManifestError(UkgpuError):
    """The image manifest is missing, malformed, or does not match the image."""


_HASHES = {"sha256": hashlib.sha256}


def _hash(path: str | os.PathLike, kinds: tuple[str, ...], limit: int | None = None
          ) -> tuple[dict[str, str], int]:
    """({kind: hex digest}, bytes read) of a file's bytes (its first `limit`, when given), read once."""
    hashes = {kind: _HASHES[kind]() for kind in kinds}
    size = 0
    with open(path, "rb") as f:
        while limit is None or size < limit:
            chunk = f.read(_CHUNK if limit is None else min(_CHUNK, limit - size))
            if not chunk:
                break
            for h in hashes.values():
                h.update(chunk)
            size += len(chunk)
    return {kind: h.hexdigest() for kind, h in hashes.items()}, size


def sha256_file(path: str | os.PathLike) -> str:
    return _hash(path, ("sha256",))[0]["sha256"]


def digests(path: str | os.PathLike) -> dict:
    """The digest and the size of one file, reading it once (build side)."""
    found, size = _hash(path, ("sha256",))
    return {**found, "size": size}


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode()


def load(path: str | os.PathLike, expected_sha256: str | None) -> dict:
    """Read the manifest; check its digest against the one the host gave us."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the image manifest {path}: {exc}; "
                            "rebuild the image with `ukgpu image build`") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is None:
        raise ManifestError("no ukgpu.manifest=<sha256> on the kernel command line, so the "
                            "image cannot be checked; boot it with `ukgpu boot DIR`")
    if actual != expected_sha256:
        raise ManifestError(f"image manifest digest {actual[:16]}... differs from "
                            f"ukgpu.manifest={expected_sha256[:16]}... given at boot: the image "
                            "was modified or mixed with another build; rebuild it")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"manifest format {manifest.get('format')!r} is not {FORMAT!r}: "
                            "boot it with the ukgpu version that built it, or rebuild")
    return manifest
