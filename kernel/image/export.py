"""`ukgpu image export --oci DIR`: a built image as OCI images for KubeVirt, plus its kernel arguments.

KubeVirt boots a VM straight from a kernel and an initramfs kept in a container image
(`spec.domain.firmware.kernelBoot.container {image, kernelPath, initrdPath}` + `kernelArgs`); it
reads them as the qemu user, uid/gid 107, so they are owned 107:107.  The root disk (root.img:
erofs + its dm-verity tree) travels as a second image in KubeVirt's containerDisk format, at
/disk/root.img (107:107), attached read-only with the virtio serial `ukgpu-root` (stage 1 finds
its disks by serial); a model too large for the root disk as a third, /disk/model.img, serial
`ukgpu-model`.  All go into one OCI layout folder, named `boot`, `root-disk` and `model-disk` in
index.json.

Beside the layout, `kernel-args.json` (and `kernel-args.txt`, the same command line alone) says
what the VM definition needs: the image's own command line (with `ukgpu.manifest=` and the disks'
verity root hashes) and the static address KubeVirt's masquerade binding expects
(guest 10.0.2.2/24, gateway 10.0.2.1: the default `vmNetworkCIDR` 10.0.2.0/24); the manifest
digests of both images; the paths.  `deploy/helm/ukgpu` takes the file as a values file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ukgpu.kernel.guest import stage1
from ukgpu.kernel.image import oci
from ukgpu.kernel.image.build import Image, ImageError

QEMU_UID = QEMU_GID = 107  # the user KubeVirt's virt-launcher runs QEMU as
KERNEL_PATH = "/boot/vmlinux"
INITRD_PATH = "/boot/initramfs"
DISK_DIR = "/disk"
MASQUERADE_IP = "ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off"
BOOT_REF = "boot"
MODEL_REF = "model-disk"
ROOT_REF = "root-disk"
ARGS_JSON = "kernel-args.json"
ARGS_TXT = "kernel-args.txt"
_ROOT_DIR = (0, 0, 0o755)


@dataclass(frozen=True)
class Export:
    """What an export wrote: the layout folder and the facts of kernel-args.json."""

    dir: Path
    args: dict


def kernel_args(image: Image, extra: list[str] | None = None) -> str:
    """The guest's command line under KubeVirt: the image's own (the manifest digest) + network."""
    cmdline = image.info.get("cmdline", "")
    if "ukgpu.manifest=" not in cmdline:
        raise ImageError(f"{image.dir}/image.json has no ukgpu.manifest= in its cmdline: rebuild the image "
                         "with `ukgpu image build`")
    words = cmdline.split()
    if not any(w.startswith("ip=") for w in words):
        words.append(MASQUERADE_IP)
    return " ".join(words + list(extra or []))


def export_oci(image: Image, out: Path, compress: bool = False, extra_args: list[str] | None = None,
               log=print) -> Export:
    """Write `image` into the OCI layout `out` (created or replaced) and its kernel-args files."""
    out = Path(out)
    if out.exists():
        if not (out / "oci-layout").exists() and any(out.iterdir()):
            raise ImageError(f"{out} exists and is not an OCI layout: choose an empty or new folder")
        shutil.rmtree(out)
    layout = oci.Layout(out)
    boot = _boot_image(layout, image, compress, log)
    root = _disk_image(layout, image, "root", compress, log)
    model = _disk_image(layout, image, "model", compress, log)
    layout.finish()
    args = {
        "kernelArgs": kernel_args(image, extra_args),
        "kernelPath": KERNEL_PATH,
        "initrdPath": INITRD_PATH,
        "manifestSha256": image.info["manifest_sha256"],
        "images": {BOOT_REF: boot.digest, ROOT_REF: root.digest, **({MODEL_REF: model.digest} if model else {})},
        "rootDiskPath": f"{DISK_DIR}/{image.info['disks']['root']}",
        "model": {"name": image.info["model"]["name"], "sha256": image.info["model"]["sha256"],
                  "size": image.info["model"]["size"], "disk": bool(image.info["model"]["disk"]),
                  **({"diskPath": f"{DISK_DIR}/{image.info['disks']['model']}"} if model else {})},
    }
    (out / ARGS_JSON).write_text(json.dumps(args, sort_keys=True, indent=1) + "\n")
    (out / ARGS_TXT).write_text(args["kernelArgs"] + "\n")
    log(f"oci: {out} ({BOOT_REF} {boot.digest}, {ROOT_REF} {root.digest}"
        + (f", {MODEL_REF} {model.digest}" if model else "") + ")")
    return Export(out, args)


def _boot_image(layout: oci.Layout, image: Image, compress: bool, log) -> oci.Descriptor:
    files = [oci.FileEntry(KERNEL_PATH.lstrip("/"), image.dir / image.info["kernel"], QEMU_UID, QEMU_GID),
             oci.FileEntry(INITRD_PATH.lstrip("/"), image.dir / image.info["initramfs"], QEMU_UID, QEMU_GID)]
    for f in files:
        if not f.source.is_file():
            raise ImageError(f"{f.source} is missing: the image folder is incomplete; rebuild it")
    log(f"oci: writing the {BOOT_REF} layer (vmlinux + initramfs)")
    layer = layout.add_layer(files, {"boot": _ROOT_DIR}, compress)
    notes = {"org.opencontainers.image.title": f"ukgpu boot files ({image.info['model']['name']})",
             "io.ukgpu.kernel-path": KERNEL_PATH, "io.ukgpu.initrd-path": INITRD_PATH,
             "io.ukgpu.manifest-sha256": image.info["manifest_sha256"]}
    return layout.add_image(BOOT_REF, [layer], notes)


def _disk_image(layout: oci.Layout, image: Image, role: str, compress: bool, log) -> oci.Descriptor | None:
    """The containerDisk image of one of the image's disks (root, model); None when it has none."""
    name = image.info.get("disks", {}).get(role)
    if name is None:
        if role == "root":
            raise ImageError(f"{image.dir}/image.json names no root disk: rebuild the image with `ukgpu image build`")
        return None
    source = image.dir / name
    if not source.is_file():
        raise ImageError(f"{source} is missing: the image folder is incomplete; rebuild it")
    ref = ROOT_REF if role == "root" else MODEL_REF
    log(f"oci: writing the {ref} layer ({name})")
    entry = oci.FileEntry(f"{DISK_DIR.lstrip('/')}/{name}", source, QEMU_UID, QEMU_GID)
    layer = layout.add_layer([entry], {DISK_DIR.lstrip("/"): (QEMU_UID, QEMU_GID, 0o755)}, compress)
    notes = {"org.opencontainers.image.title": f"ukgpu {role} disk ({image.info['model']['name']})",
             "io.ukgpu.disk-serial": stage1.SERIALS[role]}
    if role == "model":
        notes["io.ukgpu.model-sha256"] = image.info["model"]["sha256"]
    return layout.add_image(ref, [layer], notes)
