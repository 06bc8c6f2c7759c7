"""The guest kernel: an uncompressed `vmlinux` taken out of Debian's bzImage.

Why extract instead of booting the bzImage or using `linux-image-*-dbg`: under
TCG the bzImage's own xz decompressor runs emulated and costs ~3 s per boot;
decompressing once on the host with Python's lzma takes ~1 s and is cached.
The -dbg package holds a vmlinux too, but it is a ~1 GB download of debug
info.  QEMU boots an ELF vmlinux through its PVH entry note (Debian builds
with CONFIG_PVH=y).

The payload is found from the x86 boot protocol header (`setup_sects`,
`payload_offset`, `payload_length`: protocol 2.08+), not by scanning for
magic bytes, then decompressed by its own magic (xz or gzip).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from pathlib import Path

from ukgpu.llama_core.errors import UkgpuError


class KernelImageError(UkgpuError):
    """The kernel image cannot be turned into an uncompressed vmlinux."""


def _payload(bzimage: bytes, origin: Path) -> bytes:
    if bzimage[0x202:0x206] != b"HdrS":
        raise KernelImageError(f"{origin} is not an x86 bzImage (no HdrS boot header); "
                               "pass --kernel a Debian vmlinuz or an uncompressed vmlinux")
    version, = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise KernelImageError(f"{origin}: boot protocol {version:#x} has no payload fields "
                               "(needs 2.08+); pass an uncompressed vmlinux with --kernel")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start:start + length]


def _decompress(payload: bytes, origin: Path) -> bytes:
    if payload.startswith(b"\xfd7zXZ\x00"):
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        return dec.decompress(payload)  # trailing size word is left in unused_data
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(payload)  # stops at the stream's end
    raise KernelImageError(f"{origin}: kernel payload compression {payload[:4].hex()} is not "
                           "xz or gzip; pass an uncompressed vmlinux with --kernel")


def vmlinux_bytes(kernel: Path) -> bytes:
    """The uncompressed ELF kernel for `kernel` (a bzImage, or already a vmlinux)."""
    data = Path(kernel).read_bytes()
    if data[:4] == b"\x7fELF":
        return data
    elf = _decompress(_payload(data, kernel), kernel)
    if elf[:4] != b"\x7fELF":
        raise KernelImageError(f"{kernel}: the decompressed payload is not an ELF vmlinux")
    return elf


def extract_vmlinux(kernel: Path, out: Path) -> Path:
    """Write the uncompressed kernel to `out` (atomically) and return it."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(vmlinux_bytes(kernel))
    tmp.rename(out)
    return out
