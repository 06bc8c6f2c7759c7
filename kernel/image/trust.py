"""The host's own record of the images it may boot, kept outside every image folder.

Anyone who can write to an image folder can change what boots: a cpio appended to
`initramfs.cpio` replaces the guest's code (the kernel unpacks concatenated archives, later
entries win), checker included, and `image.json` can name any kernel command line.  So the
chain of trust starts on the host, not inside the image:

1. `ukgpu image build` pins what it built: the SHA-256 of `vmlinux` and `initramfs.cpio`, the
   kernel command line (which carries the manifest digest and the dm-verity root hashes of the
   root and model disks) and the model, as one record under
   `<ukgpu cache>/trusted/<image digest>.json`.  The image digest (SHA-256 of the record's
   canonical JSON) is printed; an image built elsewhere is pinned with
   `ukgpu image trust DIR --digest D`, D taken from its builder by a channel you trust.
2. `ukgpu boot` hashes both files while copying them into a private folder (0700), looks the
   pair up here, and boots the copies with the command line from the record, never from
   `image.json`: the bytes QEMU reads are the bytes checked, with no window to swap them.
3. The initramfs (now known-good code, kernel/guest/stage1.py) maps the root disk, and a model
   disk, through dm-verity with the root hashes from that command line: the guest's kernel
   checks every block as it is read, so the disks (hundreds of MiB to GiB) are never hashed whole,
   by the host or the guest, and a changed block reads as an I/O error, never as wrong bytes.
   The guest's init then loads the manifest whose digest is on the command line.  A second
   `ukgpu.root=`, `ukgpu.manifest=` or `ukgpu.verify=` after the host's is refused.

`ukgpu boot --insecure-skip-verify` skips 1-3 on request (the disks are mapped without
dm-verity); the guest then says so on /health.

A saved state (kernel/image/snapshot.py) is recorded the same way, as SHA-256 digests of its
pieces (`read_pieces`), each checked before QEMU reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ukgpu.kernel import manifest
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.models.registry import cache_dir

BOOT_FILES = ("vmlinux", "initramfs.cpio")
_CHUNK = 1 << 20


class TrustError(UkgpuError):
    """An image the host has no record of, or whose files differ from the record."""


@dataclass(frozen=True)
class Verified:
    """An image as the host's record describes it, with private copies of its boot files."""

    digest: str
    cmdline: str
    kernel: Path
    initramfs: Path
    folder: Path  # the private folder holding the copies: remove it when QEMU has exited

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def trust_dir() -> Path:
    return cache_dir() / "trusted"


def record_of(info: dict) -> dict:
    """The fields of an image's info (image.json) that the record pins."""
    model = info["model"]
    return {"cmdline": info["cmdline"], "sha256": {name: info["sha256"][name] for name in BOOT_FILES},
            "model": {k: model.get(k) for k in ("name", "path", "sha256", "disk")}}


def digest_of(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pin(info: dict) -> str:
    """Record an image the host built (its files were just written by the builder); its digest."""
    record = record_of(info)
    digest = digest_of(record)
    write_record(trust_dir(), digest, record)
    return digest


def write_record(folder: Path, name: str, record: dict) -> None:
    """folder/name.json holds `record`, written whole or not at all (a temporary file, then a
    rename): a reader never sees half a record."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True, indent=1) + "\n")
    tmp.replace(folder / f"{name}.json")


def pin_folder(image_dir: Path, info: dict, expected_digest: str) -> str:
    """Pin an image built elsewhere, after checking its files and info against the digest its
    builder printed."""
    record = record_of(info)
    digest = digest_of(record)
    if digest != expected_digest.lower():
        raise TrustError(f"{image_dir}: its image.json gives digest {digest}, not {expected_digest}: "
                         "the folder was changed or is another image; get it again from its builder")
    for name in BOOT_FILES:
        got = manifest.sha256_file(image_dir / name)
        if got != record["sha256"][name]:
            raise TrustError(f"{image_dir / name} does not match its record (sha256 {got}): the file "
                             "was changed; get the image again from its builder")
    return pin(info)


def verify_for_boot(image_dir: Path) -> Verified:
    """Copy the boot files into a private folder while hashing them, and find the host's record
    of that pair; TrustError (and no copies left behind) when there is none."""
    folder = Path(tempfile.mkdtemp(prefix="ukgpu-boot-"))  # mode 0700
    try:
        sums = {name: _copy_hashing(image_dir / name, folder / name) for name in BOOT_FILES}
        found = _matching(sums)
        if len(found) > 1:  # images of one builder share their boot files: the folder picks one
            found = [(record, digest) for record, digest in found if digest == _claimed_digest(image_dir)]
            if not found:
                raise TrustError(
                    f"{image_dir}: several images recorded on this host share these boot files and its "
                    "image.json (changed after the build?) names none of them: rebuild it with "
                    "`ukgpu image build`, or pin it with `ukgpu image trust DIR --digest D`")
        if not found:
            raise TrustError(
                f"{image_dir}: this host has no record of an image with vmlinux sha256 {sums['vmlinux']} "
                f"and initramfs.cpio sha256 {sums['initramfs.cpio']}: the files were changed after the "
                "build, or the image was built elsewhere. Rebuild it with `ukgpu image build`, or pin it "
                "with `ukgpu image trust DIR --digest D` (D from its builder)")
        (record, digest), = found
        return Verified(digest, record["cmdline"], folder / "vmlinux", folder / "initramfs.cpio", folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _claimed_digest(image_dir: Path) -> str | None:
    """The digest of the record the folder's image.json describes (not trusted: it only picks
    among recorded images that share the same boot files)."""
    try:
        return digest_of(record_of(json.loads((image_dir / "image.json").read_text())))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _matching(sums: dict[str, str]) -> list[tuple[dict, str]]:
    """Every (record, digest) with these boot files.  Images of one builder share the stage-1
    initramfs and the kernel and differ in their disks' root hashes (on the command line), so
    several can match."""
    folder = trust_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("sha256") == sums and digest_of(record) == path.stem:
            found.append((record, path.stem))
    return found


def _copy_hashing(src: Path, dest: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
    except FileNotFoundError:
        raise TrustError(f"{src} is missing: not a complete image; rebuild it with `ukgpu image build`") from None
    dest.chmod(0o400)
    return h.hexdigest()


def read_pieces(path: str | os.PathLike, chunk: int) -> Iterator[memoryview]:
    """The file in pieces of `chunk` bytes (the last one shorter), each a view of one reused buffer
    (use it before asking for the next).  Recording a state's digests and checking them read
    through here, so their pieces fall at the same offsets."""
    with open(path, "rb", buffering=0) as source:
        view = memoryview(bytearray(chunk))
        while True:
            got = 0
            while got < chunk and (n := source.readinto(view[got:])):
                got += n
            if got:
                yield view[:got]
            if got < chunk:
                return
