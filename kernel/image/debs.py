"""Debian packages as build inputs: download, unpack, and find kernel modules in them.

The guest image is assembled from the host distribution's own binary packages
(Debian bookworm), fetched with `apt-get download` (so any apt mirror or proxy
configuration applies) and unpacked with `dpkg-deb -x` (no maintainer scripts
run, nothing is installed on the host).  Everything is cached:

    $UKGPU_CACHE (or $XDG_CACHE_HOME/ukgpu, or ~/.cache/ukgpu)
        debs/NAME_VERSION_ARCH.deb        downloaded packages
        debs/root/NAME_VERSION_ARCH/      each package unpacked on its own

API
---
`cache_dir() -> Path`
    The ukgpu cache root (same rule as the model registry).
`candidate(name) -> Pkg`
    The version apt would install (`Pkg(name, version, arch)`, `.filename`).
    Runs `apt-get update` once if apt does not know the package.
`download(names) -> list[Path]`
    The `.deb` files for `names`, fetched once into `debs/`; retried after one
    `apt-get update` when the package lists are stale (HTTP 404).
`unpack(deb) -> Path`
    The package unpacked into its own cached folder (`debs/root/<stem>/`).
`fetch(names) -> list[Path]`
    `download` + `unpack`: the unpacked roots, in the order of `names`.
`kernel_package(flavour="amd64") -> str`
    The real package behind `linux-image-amd64` (e.g. `linux-image-6.1.0-41-amd64`);
    `$UKGPU_KERNEL_PACKAGE` overrides it.
`fetch_kernel(package=None) -> KernelTree`
    The unpacked kernel package: `.root`, `.release` (uname -r), `.vmlinuz`,
    `.modules_dir`, `.module_paths()` ({name: .ko path}).
`module_closure(tree, names) -> list[Path]`
    Absolute paths of the named modules (`virtio_net`, `vfio-pci`: `-`/`_`
    are the same) plus everything they depend on, ordered so that each module
    comes after its dependencies (insmod order), from each module's `.modinfo`
    `depends=` (the package has no modules.dep: depmod runs at install time).
`modinfo(ko) -> dict[str, list[str]]`
    The key=value strings of a module's `.modinfo` section.
`is_builtin(tree, name) -> bool`
    Whether a driver is compiled into the kernel (modules.builtin).

Example::

    from ukgpu.kernel import debs
    tree = debs.fetch_kernel()
    for ko in debs.module_closure(tree, ["virtio_net", "vfio_pci"]):
        print(ko)                       # .../kernel/drivers/virtio/virtio_ring.ko ...
    py_roots = debs.fetch(["python3.11-minimal", "libpython3.11-stdlib"])

Errors are `DebError` (a `UkgpuError`) whose message names the failed command
and what to do.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.llama_core.models.registry import cache_dir  # the one ukgpu cache root


class DebError(UkgpuError):
    """A Debian package could not be found, downloaded or unpacked."""


def debs_dir() -> Path:
    path = cache_dir() / "debs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Pkg:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        """The file name `apt-get download` writes (the epoch colon is %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


_updated = False


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DebError(f"{cmd[0]} is not installed: ukgpu builds images from Debian packages "
                       "and needs apt-get and dpkg-deb (a Debian or Ubuntu host)") from exc


def apt_update() -> None:
    """`apt-get update`, at most once per process."""
    global _updated
    if _updated:
        return
    res = _run(["apt-get", "update", "-qq"])
    _updated = True
    if res.returncode != 0:
        raise DebError(f"apt-get update failed: {res.stderr.strip()[-400:]}; check the apt "
                       "sources and network (run it as root, or set up an apt proxy)")


def _show(name: str) -> Pkg | None:
    res = _run(["apt-cache", "show", "--no-all-versions", name])
    fields = dict(re.findall(r"^(Package|Version|Architecture): (\S+)$", res.stdout, re.M))
    if res.returncode != 0 or len(fields) < 3:
        return None
    return Pkg(fields["Package"], fields["Version"], fields["Architecture"])


def candidate(name: str) -> Pkg:
    """The version of `name` that apt would install now."""
    pkg = _show(name)
    if pkg is None:
        apt_update()
        pkg = _show(name)
    if pkg is None:
        raise DebError(f"apt does not know the package {name!r}: check its name and that the "
                       f"Debian 'main' sources are configured (apt-cache policy {name})")
    return pkg


def download(names: list[str]) -> list[Path]:
    """Download each package once into the cache; return the .deb paths in order."""
    folder = debs_dir()
    pkgs = [candidate(n) for n in names]
    missing = [p for p in pkgs if not (folder / p.filename).exists()]
    if missing:
        _apt_download(missing, folder)
    return [folder / p.filename for p in pkgs]


def _apt_download(pkgs: list[Pkg], folder: Path) -> None:
    specs = [f"{p.name}={p.version}" for p in pkgs]
    res = _run(["apt-get", "download", "-qq", *specs], cwd=folder)
    if res.returncode != 0 and not _updated:
        apt_update()  # stale lists: the mirror dropped the old version (404)
        pkgs = [candidate(p.name) for p in pkgs]
        specs = [f"{p.name}={p.version}" for p in pkgs]
        res = _run(["apt-get", "download", "-qq", *specs], cwd=folder)
    if res.returncode != 0:
        raise DebError(f"apt-get download {' '.join(specs)} failed: {res.stderr.strip()[-400:]}; "
                       "check the network and apt sources, then retry")
    for p in pkgs:
        if not (folder / p.filename).exists():
            raise DebError(f"apt-get download did not produce {p.filename} in {folder}")


def unpack(deb: Path) -> Path:
    """Unpack one .deb (data only) into its own cached folder; return that folder."""
    dest = debs_dir() / "root" / deb.name.removesuffix(".deb")
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    _run(["rm", "-rf", str(tmp)])
    tmp.mkdir(parents=True)
    res = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    if res.returncode != 0:
        raise DebError(f"dpkg-deb -x {deb} failed: {res.stderr.strip()[-400:]}; delete the file "
                       "and retry (it is downloaded again)")
    (tmp / ".complete").write_text(deb.name + "\n")
    _run(["rm", "-rf", str(dest)])
    tmp.rename(dest)
    return dest


def fetch(names: list[str]) -> list[Path]:
    """Download and unpack `names`; return the unpacked roots in order."""
    return [unpack(deb) for deb in download(names)]


def kernel_package(flavour: str = "amd64") -> str:
    """The versioned kernel package behind linux-image-<flavour>."""
    if os.environ.get("UKGPU_KERNEL_PACKAGE"):
        return os.environ["UKGPU_KERNEL_PACKAGE"]
    meta = f"linux-image-{flavour}"
    candidate(meta)  # makes sure the lists know it
    res = _run(["apt-cache", "depends", meta])
    want = re.compile(rf"Depends: (linux-image-6\.1\.\S*-{re.escape(flavour)})$", re.M)
    match = want.search(res.stdout)
    if not match:
        raise DebError(f"{meta} does not depend on a linux-image-6.1.*-{flavour} package; "
                       "set UKGPU_KERNEL_PACKAGE to the kernel package to use")
    return match.group(1)


@dataclass(frozen=True)
class KernelTree:
    package: Pkg
    root: Path
    release: str  # `uname -r` of this kernel, e.g. 6.1.0-41-amd64

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def module_paths(self) -> dict[str, Path]:
        """Every loadable module of this kernel: {name with `_`: path of its .ko}."""
        return {module_name(p.name): p for p in sorted(self.modules_dir.rglob("*.ko*"))}


def fetch_kernel(package: str | None = None) -> KernelTree:
    """Download and unpack the Debian kernel package (default: the current 6.1 amd64)."""
    name = package or kernel_package()
    (root,) = fetch([name])
    releases = sorted(p.name for p in (root / "lib" / "modules").iterdir())
    if len(releases) != 1:
        raise DebError(f"{name} holds {len(releases)} module trees {releases}, expected one")
    return KernelTree(candidate(name), root, releases[0])


def module_name(path: str) -> str:
    """`kernel/drivers/vfio/pci/vfio-pci.ko.xz` -> `vfio_pci`."""
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base).replace("-", "_")


def modinfo(ko: Path) -> dict[str, list[str]]:
    """The `.modinfo` section of an (uncompressed) module: {key: [values]}."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise DebError(f"{ko} is not a 64-bit ELF module (compressed modules are not supported)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    info: dict[str, list[str]] = {}
    for name_off, _type, _flags, _addr, off, size in sections:
        end = data.index(b"\0", names_off + name_off)
        if data[names_off + name_off:end] != b".modinfo":
            continue
        for entry in data[off:off + size].split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def module_closure(tree: KernelTree, names: list[str]) -> list[Path]:
    """The named modules and their dependencies, dependencies first (insmod order).

    Dependencies come from each module's own `.modinfo` `depends=` field (the
    package ships no modules.dep: depmod runs at install time).
    """
    paths = tree.module_paths()
    order: list[str] = []

    def visit(mod: str, chain: tuple[str, ...]) -> None:
        if mod in order:
            return
        if mod in chain:
            raise DebError(f"module dependency cycle: {' -> '.join(chain + (mod,))}")
        if mod not in paths:
            hint = "it is built into the kernel" if is_builtin(tree, mod) else \
                "check the name (see modules.order)"
            raise DebError(f"kernel {tree.release} has no loadable module {mod!r}: {hint}")
        depends = modinfo(paths[mod]).get("depends", [""])[0]
        for dep in filter(None, depends.split(",")):
            visit(module_name(dep), chain + (mod,))
        order.append(mod)

    for name in names:
        visit(module_name(name), ())
    return [paths[m] for m in order]


def is_builtin(tree: KernelTree, name: str) -> bool:
    """Whether `name` is compiled into the kernel (listed in modules.builtin)."""
    builtin = tree.modules_dir / "modules.builtin"
    key = name.replace("-", "_")
    return any(module_name(line) == key for line in builtin.read_text().splitlines())
