"""A reproducible initramfs (cpio "newc") writer.

The Linux kernel unpacks a newc cpio archive into its root tmpfs before it runs
`/init`.  This writer makes the same bytes from the same inputs: entries are
sorted by path, inode numbers are assigned in that order, every mtime is fixed
(`$SOURCE_DATE_EPOCH` or 0), owners are root:root, and there is no compression
unless asked for (an uncompressed archive boots fastest under TCG).

API
---
`Initramfs()`
    An in-memory listing of the archive; nothing is read until `write`.
`.add_dir(path, mode=0o755)`
`.add_file(path, source=None, data=None, mode=None)`
    Content from a host file (`source`, streamed at write time; mode defaults
    to the source's permission bits) or from `data` bytes (mode 0o644).
`.add_symlink(path, target)`
`.add_node(path, kind, major, minor, mode=0o600)`  (`kind` "c" or "b")
`.add_tree(host_dir, dest="/", keep=None)`
    A whole host directory (files, dirs, symlinks; `keep(rel_path) -> bool`
    filters by path relative to `host_dir`).
`.write(out_path, compress=None) -> int`
    Writes the archive (`compress="gzip"` for a gzip stream with a fixed
    header) and returns its size in bytes.  Parent directories are implied.
`.entries` {path: Entry}, `.size_by(prefixes) -> dict` for size breakdowns.

Paths are absolute in the guest (`/usr/lib/...`); they are stored without the
leading slash, as the kernel expects.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ukgpu.llama_core.errors import UkgpuError

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_CHUNK = 1 << 20


class InitramfsError(UkgpuError):
    """An initramfs entry is invalid or its source is missing."""


@dataclass(frozen=True)
class Entry:
    mode: int  # full st_mode: type bits | permission bits
    source: Path | None = None
    data: bytes = b""
    major: int = 0  # rdev, for device nodes
    minor: int = 0

    def size(self) -> int:
        if self.source is not None:
            return self.source.stat().st_size
        return len(self.data)


def _norm(path: str | PurePosixPath) -> str:
    parts = [p for p in PurePosixPath("/", path).parts[1:] if p not in ("", ".")]
    if ".." in parts or not parts:
        raise InitramfsError(f"bad initramfs path {path!r}: use an absolute path below /")
    return "/".join(parts)


class Initramfs:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _put(self, path: str | PurePosixPath, entry: Entry) -> None:
        self.entries[_norm(path)] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(path, Entry(stat.S_IFDIR | mode))

    def add_file(self, path: str, source: Path | None = None, data: bytes | None = None,
                 mode: int | None = None) -> None:
        if (source is None) == (data is None):
            raise InitramfsError(f"{path}: give exactly one of source= or data=")
        if source is not None:
            source = Path(source)
            if not source.is_file():
                raise InitramfsError(f"{path}: source {source} is not a file")
            perm = stat.S_IMODE(source.stat().st_mode) if mode is None else mode
            self._put(path, Entry(stat.S_IFREG | perm, source=source))
        else:
            self._put(path, Entry(stat.S_IFREG | (0o644 if mode is None else mode), data=data))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(path, Entry(stat.S_IFLNK | 0o777, data=target.encode()))

    def add_node(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if kind not in kinds:
            raise InitramfsError(f"{path}: device kind must be 'c' or 'b', not {kind!r}")
        self._put(path, Entry(kinds[kind] | mode, major=major, minor=minor))

    def add_tree(self, host_dir: Path, dest: str = "/",
                 keep: Callable[[str], bool] | None = None) -> None:
        host_dir = Path(host_dir)
        for root, dirs, files in os.walk(host_dir):
            rel_root = Path(root).relative_to(host_dir)
            for name in sorted(dirs + files):
                host = Path(root) / name
                rel = (rel_root / name).as_posix()
                if keep is not None and not keep(rel):
                    if name in dirs:
                        dirs.remove(name)
                    continue
                self._add_host(host, f"{dest.rstrip('/')}/{rel}")

    def _add_host(self, host: Path, path: str) -> None:
        st = host.lstat()
        if stat.S_ISLNK(st.st_mode):
            self.add_symlink(path, os.readlink(host))
        elif stat.S_ISDIR(st.st_mode):
            self.add_dir(path, stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            self.add_file(path, source=host)

    def size_by(self, prefixes: dict[str, str | tuple[str, ...]]) -> dict[str, int]:
        """Payload bytes per label: {label: prefix(es)}; the first matching label wins."""
        totals = dict.fromkeys(prefixes, 0) | {"other": 0}
        for path, entry in self.entries.items():
            if not stat.S_ISREG(entry.mode):
                continue
            label = next((lb for lb, pre in prefixes.items() if ("/" + path).startswith(pre)),
                         "other")
            totals[label] += entry.size()
        return totals

    def _complete(self) -> dict[str, Entry]:
        entries = dict(self.entries)
        for path in list(entries):
            parent = PurePosixPath(path).parent
            while str(parent) != ".":
                entries.setdefault(str(parent), Entry(stat.S_IFDIR | 0o755))
                parent = parent.parent
        return entries

    def write(self, out_path: Path, compress: str | None = None) -> int:
        """Write the archive; returns its size in bytes."""
        if compress not in (None, "gzip"):
            raise InitramfsError(f"unknown compression {compress!r}: use None or 'gzip'")
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        out_path = Path(out_path)
        tmp = out_path.with_name(out_path.name + ".tmp")
        with open(tmp, "wb") as raw:
            if compress == "gzip":
                with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=mtime,
                                   compresslevel=6) as gz:
                    self._write_cpio(gz, mtime)
            else:
                self._write_cpio(raw, mtime)
        tmp.rename(out_path)
        return out_path.stat().st_size

    def _write_cpio(self, out: BinaryIO, mtime: int) -> None:
        written = 0
        for ino, (path, entry) in enumerate(sorted(self._complete().items()), start=1):
            written += _write_entry(out, path, entry, ino, mtime, written)
        written += _write_entry(out, _TRAILER, Entry(0), 0, 0, written)
        out.write(b"\0" * (-written % 512))


def _header(name: bytes, entry: Entry, ino: int, mtime: int, size: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, mtime, size, 0, 0, entry.major, entry.minor,
              len(name) + 1, 0)
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def _write_entry(out: BinaryIO, path: str, entry: Entry, ino: int, mtime: int, at: int) -> int:
    """Write one header + name + data, each padded to 4 bytes; return bytes written."""
    name = path.encode()
    size = entry.size() if stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode) else 0
    head = _header(name, entry, ino, mtime, size) + name + b"\0"
    head += b"\0" * (-(at + len(head)) % 4)
    out.write(head)
    if entry.source is not None:
        copied = _copy(entry.source, out)
        if copied != size:
            raise InitramfsError(f"{entry.source} changed size while writing the initramfs")
    else:
        out.write(entry.data)
    pad = -size % 4
    out.write(b"\0" * pad)
    return len(head) + size + pad


def _copy(source: Path, out: BinaryIO) -> int:
    copied = 0
    with open(source, "rb") as f:
        while chunk := f.read(_CHUNK):
            out.write(chunk)
            copied += len(chunk)
    return copied
