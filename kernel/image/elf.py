"""Shared-library closure of ELF files, read with the standard library only.

The image holds only the shared libraries that its executables and Python
extension modules actually load: `needed(path)` reads DT_NEEDED and
DT_RUNPATH/DT_RPATH from the dynamic section, and `closure()` resolves them
against a pool of candidate library files (the unpacked Debian packages and
the wheels' bundled `*.libs` folders).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ukgpu.llama_core.errors import UkgpuError

_SHT_DYNAMIC = 6
_DT_NEEDED, _DT_RPATH, _DT_RUNPATH = 1, 15, 29


class ElfError(UkgpuError):
    """A shared library that an image file needs cannot be found."""


@dataclass(frozen=True)
class Dynamic:
    needed: tuple[str, ...]
    search: tuple[str, ...]  # RUNPATH/RPATH entries, $ORIGIN unexpanded


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def dynamic(path: Path) -> Dynamic:
    """DT_NEEDED names and run paths of a 64-bit little-endian ELF file."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
    needed: list[str] = []
    search: list[str] = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info in headers:
        if sh_type != _SHT_DYNAMIC:
            continue
        strtab = headers[link][4]
        for i in range(0, size, 16):
            tag, value = struct.unpack_from("<qQ", data, offset + i)
            if tag not in (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH):
                continue
            text = data[strtab + value:data.index(b"\0", strtab + value)].decode()
            (needed if tag == _DT_NEEDED else search).extend(
                [text] if tag == _DT_NEEDED else text.split(":"))
    return Dynamic(tuple(needed), tuple(search))


def closure(roots: dict[str, Path], pool: dict[str, Path],
            default_dirs: tuple[str, ...]) -> dict[str, Path]:
    """Every library the ELF files in `roots` load, transitively.

    roots: {guest path: host file}; pool: {guest path: host file} of every
    library that may be used; default_dirs: the dynamic loader's search path
    in the guest.  Returns {guest path: host file} of the libraries needed.
    Raises ElfError naming the missing library and who needs it.
    """
    found: dict[str, Path] = {}
    todo = list(roots.items())
    while todo:
        guest, host = todo.pop()
        dyn = dynamic(host)
        origin = str(PurePosixPath(guest).parent)
        dirs = [d.replace("$ORIGIN", origin) for d in dyn.search] + list(default_dirs)
        for name in dyn.needed:
            path = _resolve(name, dirs, pool)
            if path is None:
                raise ElfError(f"{guest} needs {name}, which no package in the image provides; "
                               "add the Debian package that ships it to the image's library list")
            if path not in found and path not in roots:
                found[path] = pool[path]
                todo.append((path, pool[path]))
    return found


def _resolve(name: str, dirs: list[str], pool: dict[str, Path]) -> str | None:
    for folder in dirs:
        candidate = str(PurePosixPath(folder, name))
        normal = _normalize(candidate)
        if normal in pool:
            return normal
    return None


def _normalize(path: str) -> str:
    parts: list[str] = []
    for part in PurePosixPath(path).parts[1:]:
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/" + "/".join(parts)
