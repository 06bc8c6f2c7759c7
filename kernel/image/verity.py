"""dm-verity hash trees, made on the host: a disk whose every 4 KiB block the guest's kernel checks
on read against a root hash the host puts on the kernel command line.

The layout is the kernel's (format version 1, 4096-byte data and hash blocks, the salt hashed
before each block, no superblock), as `veritysetup format --no-superblock` writes it:

    [data blocks][top level][level n-2]...[level 0: one digest per data block]

Level 0 holds a 32-byte digest per data block, 128 to a hash block (zero padded); each level
above holds the digests of the hash blocks below it, up to a level of one block, whose digest is
the root hash.  The tree is appended to the data (padded to whole blocks), so one read-only disk
carries both: the guest's table points data and hash at the same device, the hash area starting
at block `data_blocks`.  `tests/unit/test_verity.py` checks the bytes against veritysetup's.

The hash is BLAKE2b-256 (the kernel's `blake2b-256`) unless asked otherwise: under TCG the guest's
kernel hashes every block it reads, and BLAKE2b's 64-bit arithmetic emulates several times
faster than SHA-256's (docs/benchmarks/image.md); on real hardware both far outrun the disk.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096
DIGEST = 32
# kernel crypto name -> hashlib constructor; both give 32-byte digests
HASHES = {"sha256": hashlib.sha256, "blake2b-256": lambda data=b"": hashlib.blake2b(data, digest_size=32)}
DEFAULT_HASH = "blake2b-256"
PER_BLOCK = BLOCK // DIGEST  # 128 digests in a hash block


@dataclass(frozen=True)
class Verity:
    """What the guest needs to map a verity disk: data size, root hash, salt, hash algorithm."""

    data_blocks: int
    root_hash: str
    salt: str
    algorithm: str = DEFAULT_HASH

    def word(self) -> str:
        """`<data blocks>:<root hash>:<salt>:<hash>`, the value of ukgpu.root= / ukgpu.model_disk=."""
        return f"{self.data_blocks}:{self.root_hash}:{self.salt}:{self.algorithm}"


def _digests(blocks: list[bytes], salt: bytes, algorithm: str) -> bytes:
    new = HASHES[algorithm]
    out = bytearray()
    for block in blocks:
        out += new(salt + block).digest()
    return bytes(out)


def _pack(digests: bytes) -> list[bytes]:
    """Digests into zero-padded hash blocks."""
    step = PER_BLOCK * DIGEST
    return [digests[i:i + step].ljust(BLOCK, b"\0") for i in range(0, len(digests), step)]


def hash_tree(path: Path, salt: bytes, data_blocks: int, algorithm: str = DEFAULT_HASH,
              workers: int | None = None) -> tuple[bytes, list[bytes]]:
    """(root digest, hash blocks in disk order: top level first) for the first `data_blocks`
    blocks of `path` (a short last block counts as zero padded)."""
    chunk = 4096  # data blocks a worker hashes at a time (16 MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        def level0(first: int) -> bytes:
            count = min(chunk, data_blocks - first)
            raw = os.pread(fd, count * BLOCK, first * BLOCK).ljust(count * BLOCK, b"\0")
            return _digests([raw[i:i + BLOCK] for i in range(0, len(raw), BLOCK)], salt, algorithm)

        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:  # sha256 frees the GIL
            digests = b"".join(pool.map(level0, range(0, data_blocks, chunk)))
    finally:
        os.close(fd)
    if data_blocks == 1:  # no hash levels: the root is the one data block's digest
        return digests, []
    levels = [_pack(digests)]
    while len(levels[-1]) > 1:
        levels.append(_pack(_digests(levels[-1], salt, algorithm)))
    root = HASHES[algorithm](salt + levels[-1][0]).digest()
    return root, [block for level in reversed(levels) for block in level]


def append_tree(path: Path, salt: bytes, algorithm: str = DEFAULT_HASH) -> Verity:
    """Pad `path` to whole blocks, append its hash tree; what the guest's table needs."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty: nothing to protect")
    data_blocks = -(-size // BLOCK)
    with open(path, "r+b") as f:
        f.truncate(data_blocks * BLOCK)
    root, blocks = hash_tree(path, salt, data_blocks, algorithm)
    with open(path, "ab") as f:
        for block in blocks:
            f.write(block)
    return Verity(data_blocks, root.hex(), salt.hex(), algorithm)


def copy_with_tree(src: Path, dest: Path, salt: bytes, algorithm: str = DEFAULT_HASH) -> Verity:
    """`src` copied to `dest` (padded to whole blocks) with its hash tree appended."""
    tmp = dest.with_name(dest.name + ".tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(1 << 24):
            fout.write(chunk)
    verity = append_tree(tmp, salt, algorithm)
    tmp.replace(dest)
    return verity


__all__ = ["BLOCK", "Verity", "append_tree", "copy_with_tree", "hash_tree"]
