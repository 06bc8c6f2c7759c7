"""`ukgpu image build`: a bootable image for one model.

An image directory holds:

    vmlinux          the Debian 6.1 kernel, uncompressed (boots ~3 s faster under TCG)
    initramfs.cpio   ~12 MiB: Python, the virtio/dm-verity/erofs modules and stage 1
                     (kernel/guest/stage1.py), which maps and mounts root.img
    root.img         the guest's root filesystem (erofs: Python, numpy, numba and its cache, the
                     HTTP stack, ukgpu, kernel modules, busybox, the manifest and a small model)
                     followed by its dm-verity hash tree; attached read-only
    model.img        a model above `embed_limit` (200 MiB): the GGUF file + its hash tree, its
                     own read-only disk, memory-mapped by the guest as /dev/ukgpu-model
    manifest.json    the same manifest as /etc/ukgpu/manifest.json on the root disk
    image.json       what `ukgpu boot` needs: files, kernel command line (with the disks'
                     verity root hashes and the manifest digest), model

Every block the guest reads from a disk is checked by its kernel against the root hash on the
command line, which the host takes from its own record (trust.py): nothing is hashed whole
before serving.  Builds are cached under `<ukgpu cache>/images/<input hash>/`: the same inputs
give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ukgpu.kernel import manifest
from ukgpu.kernel.guest import stage1
from ukgpu.kernel.image import (
    debs,
    guest_closure,
    rootfs,
    trust,
    verity,
)
from ukgpu.kernel.image import (
    elf as image_elf,
)
from ukgpu.kernel.image import (
    python_layout as image_python,
)
from ukgpu.kernel.image import (
    stage as image_stage,
)
from ukgpu.kernel.image import (
    vmlinux as image_kernel,
)
from ukgpu.llama_core.errors import UkgpuError

BUILDER_VERSION = "2"
DEFAULT_MODEL = "smollm2-135m"
EMBED_LIMIT = 200 << 20
GUEST_MODELS = "/models"
MODEL_DISK = stage1.MODEL_NODE  # the model disk's verity mapping, made by stage 1
ROOT_DISK, MODEL_DISK_FILE = "root.img", "model.img"
NET_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_rng")
VFIO_MODULES = ("vfio_pci", "vfio_iommu_type1")
POWER_MODULES = ("button", "evdev")  # the ACPI power button as an input device (kernel/guest/power_button.py)
FS_MODULES = ("overlay",)  # a writable layer over the numba cache's read-only folders
GUEST_MODULES = NET_MODULES + VFIO_MODULES + POWER_MODULES + FS_MODULES  # what the guest's init loads
GUEST_IMPORTS = ("numpy", "starlette", "uvicorn", "ukgpu.kernel.guest.init", "ukgpu.kernel.guest.engine_setup",
                 "ukgpu.kernel.api.app", "ukgpu.kernel.api.server", "ukgpu.llama_core.engine",
                 "ukgpu.llama_core.cpu.backend", "ukgpu.llama_core.text.chat")
INIT_SCRIPT = b"""#!/usr/bin/python3.11 -IBu
import time
t_init = time.clock_gettime(time.CLOCK_BOOTTIME)
from ukgpu.kernel.guest.init import main
main(t_init)
"""
REPO = Path(__file__).resolve().parents[2]


class ImageError(UkgpuError):
    """An image cannot be built or read."""


@dataclass
class BuildConfig:
    model: str = DEFAULT_MODEL
    out: Path | None = None
    kernel: Path | None = None  # a bzImage/vmlinuz or vmlinux; default: Debian's
    embed_limit: int = EMBED_LIMIT
    numba: bool = True  # the CPU backend's kernels; +~185 MiB, see docs/benchmarks/image.md
    force: bool = False


@dataclass
class Image:
    dir: Path
    info: dict = field(default_factory=dict)

    @property
    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())


@dataclass
class Inputs:
    """Everything the image is made of, resolved, plus the hash that names the build."""

    model_path: Path
    model_sha256: str
    kernel: debs.KernelTree
    kernel_image: Path
    deb_roots: dict[str, Path]
    py_versions: dict[str, str]
    layout: image_python.Layout
    key: str = ""


def images_dir() -> Path:
    return debs.cache_dir() / "images"


def build(config: BuildConfig, log=print) -> Image:
    """Build (or reuse from the cache) the image for `config`; copy it to config.out."""
    inputs = _resolve(config, log)
    cached = images_dir() / inputs.key[:20]
    if config.force or not (cached / "image.json").exists():
        _build_into(cached, inputs, config, log)
    else:
        log(f"image: reusing cached build {cached}")
    image = Image(cached, json.loads((cached / "image.json").read_text()))
    try:  # the host's record (trust.py): checked against the files, also for a cached build
        digest = trust.pin_folder(cached, image.info, trust.digest_of(trust.record_of(image.info)))
    except trust.TrustError as exc:
        raise ImageError(f"the cached build is damaged ({exc}); rebuild it with --force") from None
    log(f"image: digest {digest} (pinned on this host for `ukgpu boot`; elsewhere: "
        f"`ukgpu boot DIR --pin {digest}`)")
    if config.out is not None:
        image = _export(image, Path(config.out))
    return image


def load(path: Path) -> Image:
    path = Path(path)
    if not (path / "image.json").exists():
        raise ImageError(f"{path} is not a ukgpu image (no image.json): build one with "
                         "`ukgpu image build -o DIR`")
    return Image(path, json.loads((path / "image.json").read_text()))


def _resolve(config: BuildConfig, log) -> Inputs:
    from ukgpu.llama_core.models.registry import resolve_model

    model_path = resolve_model(config.model)
    log(f"image: model {model_path} ({model_path.stat().st_size / 2**20:.0f} MiB)")
    kernel = debs.fetch_kernel()
    names = list(image_python.PYTHON_DEBS + image_python.LIB_DEBS + ("busybox-static",))
    deb_roots = dict(zip(names, debs.fetch(names)))
    layout = image_python.python_layout([deb_roots[n] for n in image_python.PYTHON_DEBS])
    dists = image_python.GUEST_DISTS + (image_python.NUMBA_DISTS if config.numba else ())
    site, py_versions = image_python.site_layout(dists)
    layout.update(site)
    layout.update(image_python.ukgpu_layout(REPO))
    inputs = Inputs(model_path, manifest.sha256_file(model_path), kernel,
                    Path(config.kernel) if config.kernel else kernel.vmlinuz,
                    deb_roots, py_versions, layout)
    inputs.key = _input_key(inputs, config)
    return inputs


def _input_key(inputs: Inputs, config: BuildConfig) -> str:
    digest = hashlib.sha256()
    parts = {
        "builder": BUILDER_VERSION,
        "builder_sources": _builder_digest(),
        "debs": sorted(p.name for p in inputs.deb_roots.values()),
        "kernel": [inputs.kernel.root.name, manifest.sha256_file(inputs.kernel_image)],
        "model": inputs.model_sha256,
        "embed_limit": config.embed_limit,
        "python": inputs.py_versions,
        "numba": config.numba,
        "verity_hash": verity.DEFAULT_HASH,
    }
    digest.update(json.dumps(parts, sort_keys=True).encode())
    for guest, host in sorted(inputs.layout.files.items()):  # ukgpu sources change often
        digest.update(guest.encode())
        digest.update(host.read_bytes() if "/ukgpu/" in guest else str(host.stat().st_size).encode())
    return digest.hexdigest()


def _builder_digest() -> str:
    """The image builder's own sources (the closure of this module, not the launcher's): a change
    to how images are made rebuilds them; the image itself holds only guest files."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parents[2]
    for name, path in guest_closure.import_closure(here, __name__).items():
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _build_into(out: Path, inputs: Inputs, config: BuildConfig, log) -> None:
    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    layout = inputs.layout
    _add_system(layout, inputs)
    image_stage.stage(layout, root)
    (root / "init").write_bytes(INIT_SCRIPT)
    (root / "init").chmod(0o755)
    pycs = image_stage.compile_bytecode(root)
    log(f"image: compiled {len(pycs)} bytecode files")
    log("image: " + image_stage.chroot_check(root, GUEST_IMPORTS))
    if config.numba:
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        log("image: " + image_stage.precompile_numba(root, mtime, inputs.model_path))

    embed = inputs.model_path.stat().st_size <= config.embed_limit
    model_guest = f"{GUEST_MODELS}/{inputs.model_path.name}" if embed else None
    if model_guest:
        dest = root / model_guest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inputs.model_path, dest)
        dest.chmod(0o444)
    doc = _manifest(root, inputs, model_guest)
    raw = manifest.dumps(doc)
    (root / manifest.GUEST_PATH.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / manifest.GUEST_PATH.lstrip("/")).write_bytes(raw)
    for d in manifest.RUNTIME_DIRS:
        (root / d.lstrip("/")).mkdir(exist_ok=True)

    work_out = work / "out"
    work_out.mkdir()
    log("image: writing root.img (erofs + dm-verity hash tree)")
    disks = {"root": rootfs.make_root_disk(root, work_out / ROOT_DISK, inputs.key)}
    if not embed:
        log(f"image: writing {MODEL_DISK_FILE} (the model + its hash tree)")
        disks["model"] = rootfs.make_model_disk(inputs.model_path, work_out / MODEL_DISK_FILE,
                                                inputs.model_sha256)
    log("image: writing initramfs.cpio (stage 1: reach the verified root)")
    modules = {_module_guest(inputs.kernel, ko): ko for ko in rootfs.stage1_modules(inputs.kernel)}
    cpio_size = rootfs.stage1_initramfs(root, modules, work_out / "initramfs.cpio")
    log("image: " + _check_stage1(work_out / "initramfs.cpio", work))
    image_kernel.extract_vmlinux(inputs.kernel_image, work_out / "vmlinux")
    (work_out / "manifest.json").write_bytes(raw)
    info = _image_info(work_out, doc, raw, cpio_size, inputs, disks)
    (work_out / "image.json").write_text(json.dumps(info, sort_keys=True, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    work_out.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    log(breakdown(info))


def _check_stage1(cpio: Path, work: Path) -> str:
    """Unpack the initramfs and import stage1 from it with its own interpreter (chroot)."""
    unpacked = work / "initramfs"
    unpacked.mkdir()
    with open(cpio, "rb") as f:
        res = subprocess.run(["cpio", "-idm", "--quiet"], stdin=f, cwd=unpacked, capture_output=True,
                             text=True, check=False)
    if res.returncode != 0:
        return f"skipped the stage-1 import check (cpio: {res.stderr.strip()[:200]})"
    return rootfs.check_stage1(unpacked)


def _add_system(layout: image_python.Layout, inputs: Inputs) -> None:
    """Libraries, kernel modules, busybox and the merged-/usr links."""
    lib_roots = [inputs.deb_roots[n] for n in image_python.LIB_DEBS]
    pool = image_python.lib_pool(lib_roots)
    elves = {g: h for g, h in layout.files.items()
             if (g.endswith(".so") or ".so." in g or g.startswith("/usr/bin/"))
             and image_elf.is_elf(h)}
    pool.update({g: h for g, h in elves.items() if ".libs/" in g})  # wheels' bundled libs
    layout.files.update(image_elf.closure(elves, pool, image_python.LIB_DIRS))
    loader = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    layout.files[loader] = pool[loader]
    layout.links["/usr/lib64/ld-linux-x86-64.so.2"] = loader
    for top in ("lib", "lib64", "bin", "sbin"):
        layout.links[f"/{top}"] = f"usr/{top}"
    layout.files["/usr/bin/busybox"] = inputs.deb_roots["busybox-static"] / "bin" / "busybox"
    layout.links["/usr/bin/sh"] = "busybox"
    tree = inputs.kernel
    wanted = [m for m in GUEST_MODULES if not debs.is_builtin(tree, m)]
    for ko in debs.module_closure(tree, wanted):
        layout.files[_module_guest(tree, ko)] = ko


def _module_guest(tree: debs.KernelTree, ko: Path) -> str:
    return f"/usr/lib/modules/{tree.release}/{ko.relative_to(tree.modules_dir).as_posix()}"


def _manifest(root: Path, inputs: Inputs, model_guest: str | None) -> dict:
    files, links = {}, {}
    for path in sorted(root.rglob("*")):
        guest = "/" + path.relative_to(root).as_posix()
        if path.is_symlink():
            links[guest] = os.readlink(path)
        elif path.is_file():
            files[guest] = manifest.digests(path)
    tree = inputs.kernel
    wanted = [m for m in GUEST_MODULES if not debs.is_builtin(tree, m)]
    return {
        "format": manifest.FORMAT,
        "files": files,
        "links": links,
        "modules": [_module_guest(tree, ko) for ko in debs.module_closure(tree, wanted)],
        "kernel": {"package": tree.package.name, "version": tree.package.version,
                   "release": tree.release, "image_sha256": manifest.sha256_file(inputs.kernel_image)},
        "model": {"name": inputs.model_path.stem, "sha256": inputs.model_sha256,
                  "size": inputs.model_path.stat().st_size,
                  "path": model_guest or MODEL_DISK, "disk": model_guest is None},
        "inputs": {"debs": sorted(p.name for p in inputs.deb_roots.values()),
                   "python": inputs.py_versions, "key": inputs.key},
    }


SIZE_GROUPS = {
    "model": GUEST_MODELS + "/",
    "numpy": f"{image_python.SITE}/numpy",
    "ukgpu": f"{image_python.SITE}/ukgpu/",
    "numba+llvmlite": (f"{image_python.SITE}/numba", f"{image_python.SITE}/llvmlite"),
    "http+gguf": f"{image_python.SITE}/",
    "python stdlib": image_python.STDLIB + "/",
    "kernel modules": "/usr/lib/modules/",
    "shared libs": "/usr/lib/",
    "binaries": "/usr/bin/",
}


def size_by(files: dict[str, dict]) -> dict[str, int]:
    """Bytes of the manifest's files per SIZE_GROUPS label (the first matching label wins)."""
    totals = dict.fromkeys(SIZE_GROUPS, 0) | {"other": 0}
    for guest, entry in files.items():
        label = next((k for k, v in SIZE_GROUPS.items()
                      if guest.startswith(v if isinstance(v, tuple) else (v,))), "other")
        totals[label] += entry["size"]
    return {k: v for k, v in totals.items() if v}


def _image_info(out: Path, doc: dict, raw: bytes, cpio_size: int, inputs: Inputs,
                disks: dict) -> dict:
    sizes = {"initramfs": cpio_size, "vmlinux": (out / "vmlinux").stat().st_size,
             "root.img": (out / ROOT_DISK).stat().st_size,
             **({"model.img": (out / MODEL_DISK_FILE).stat().st_size} if "model" in disks else {}),
             **{f"root:{k}": v for k, v in size_by(doc["files"]).items()}}
    manifest_sha = hashlib.sha256(raw).hexdigest()
    cmdline = (f"console=ttyS0 panic=-1 quiet ukgpu.manifest={manifest_sha} "
               f"ukgpu.root={disks['root'].word()}")
    if "model" in disks:
        cmdline += f" ukgpu.model_disk={disks['model'].word()}"
    return {
        "kernel": "vmlinux",
        "initramfs": "initramfs.cpio",
        "disks": {"root": ROOT_DISK, **({"model": MODEL_DISK_FILE} if "model" in disks else {})},
        "cmdline": cmdline,
        "manifest_sha256": manifest_sha,
        "model": doc["model"],
        "sha256": {name: manifest.sha256_file(out / name) for name in ("vmlinux", "initramfs.cpio")},
        "sizes": sizes,
        "key": inputs.key,
    }


def breakdown(info: dict) -> str:
    mib = 1 << 20
    rows = [f"{name:<28}{size / mib:10.1f} MiB" for name, size in info["sizes"].items()]
    model = info["model"]
    where = "on its own verity disk (model.img)" if model["disk"] else "on the root disk"
    rows.append(f"model {model['name']} ({model['size'] / mib:.1f} MiB) {where}")
    return "image size breakdown:\n  " + "\n  ".join(rows)


def _export(image: Image, out: Path) -> Image:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinux", "initramfs.cpio", "manifest.json", "image.json", *image.info.get("disks", {}).values()):
        dest = out / name
        if dest.exists():
            dest.unlink()
        shutil.copy2(image.dir / name, dest)  # a copy: editing the export never edits the cache
    print(f"image: written to {out}", file=sys.stderr)
    return load(out)
