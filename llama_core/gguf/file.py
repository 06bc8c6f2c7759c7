"""Memory-mapped GGUF files: metadata as Python values, arrays and tensors left in the mapping.

The header is parsed here (not with gguf-py's GGUFReader, which on the 0.5B model
took ~5 s and ~380 MB of resident memory for its per-string numpy views) and every
count, length and offset is checked against the file size before it is used, so a
corrupt, truncated or hostile file raises GGUFError instead of crashing, hanging or
allocating without bound.  Tensor data is never read at open time: each
`TensorView.data` is a read-only uint8 view into the mapping.

Opening a file of N bytes costs O(N) time and at most about N bytes of memory besides
the mapping: metadata arrays are `GGUFArray`s, not lists (a list of Python ints or
strings costs 9-12x the bytes it was read from: a 16M-entry vocabulary took 1.5 GB
and 69 s).  A numeric array is a numpy view of the mapping; a string array keeps one
8-byte offset per string and decodes a string when it is read.  The Python objects
that do get made per entry (keys, scalars, arrays of arrays, tensor infos) are capped
in number, since each costs ~10x its bytes in the file.

Format (little-endian): magic "GGUF", version u32 (2 or 3), tensor count u64,
metadata count u64; metadata entries (key string, value type u32, value); tensor
infos (name string, n_dims u32, dims u64[n_dims] innermost first, ggml type u32,
offset u64 relative to the data section); padding to `general.alignment`
(default 32); the data section.  A string is a u64 length then UTF-8 bytes.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import stat
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ukgpu.llama_core.errors import GGUFError, QuantError
from ukgpu.llama_core.gguf import quants
from ukgpu.llama_core.models.config import ModelConfig, config_from_gguf

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_LEN = 1 << 24  # 16M elements: 100x the largest vocabulary seen
MAX_NESTING = 2
MAX_OBJECTS = 1 << 16  # metadata entries plus arrays inside arrays (real files: ~50 entries)
MAX_TENSORS = 1 << 16  # the largest real models have a few thousand tensors
_ITER_CHUNK = 1 << 14  # numeric arrays are iterated through Python lists of this many values

# GGUF value type -> struct format / numpy dtype of the scalar types; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1",
               10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorView:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, rows first (GGUF dims reversed)
    data: np.ndarray  # uint8[nbytes], read-only view into the mapped file

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        return quants.row_bytes(self.qtype, self.shape[-1])

    def rows(self) -> np.ndarray:
        """uint8[n_rows, row_bytes]: the raw blocks, one row of the matrix per line (no copy)."""
        return self.data.reshape(-1, self.row_bytes)

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape`."""
        return quants.dequantize(self.data, self.qtype, self.n_elements).reshape(self.shape)

    def release_pages(self) -> bool:
        """Drop this tensor's pages from the process's resident set (after a backend copied
        it into another layout).  The mapping stays valid: a later read faults the pages back
        in from the page cache.  Only for views into a read-only file mapping; False otherwise."""
        if self.data.flags.writeable or not isinstance(_mapping_of(self.data), mmap.mmap):
            return False
        start = self.data.ctypes.data
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
        last = (start + self.data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
        return True


_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mapping_of(arr: np.ndarray) -> object:
    """The object at the bottom of an array's base chain (an mmap for tensor views)."""
    obj: object = arr
    while True:
        nxt = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if nxt is None:
            return obj
        obj = nxt


class GGUFArray(Sequence):
    """A metadata array read in place: an immutable sequence of Python values.

    Numbers are a numpy view of the mapping (`np.asarray(arr)` gives it without a
    copy); strings are decoded (and checked for UTF-8) when read; an array of arrays
    holds GGUFArrays.  It compares equal to a list or tuple with the same values.
    """

    __slots__ = ("what", "kind", "_data", "_buf")

    def __init__(self, what: str, kind: str, data: Any, buf: Any = None):
        self.what = what  # "<path>: metadata '<key>'", for error messages
        self.kind = kind  # "number", "bool", "string" or "array"
        self._data = data  # numpy view | int64 offsets of the strings (n + 1) | list of GGUFArray
        self._buf = buf

    def __len__(self) -> int:
        return len(self._data) - 1 if self.kind == "string" else len(self._data)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {self.what} ({n} items)")
        index %= n
        if self.kind == "string":
            return self._string(index)
        if self.kind == "array":
            return self._data[index]
        value = self._data[index].item()
        return bool(value) if self.kind == "bool" else value

    def __iter__(self) -> Iterator[Any]:
        if self.kind == "string":
            return self._strings()
        if self.kind == "array":
            return iter(self._data)
        return (v for i in range(0, len(self), _ITER_CHUNK) for v in self._chunk(i))

    def _chunk(self, start: int) -> list:
        values = self._data[start : start + _ITER_CHUNK]
        return (values != 0).tolist() if self.kind == "bool" else values.tolist()

    def _strings(self) -> Iterator[str]:
        """Every string in order: the offsets become one list first (a numpy scalar per string
        costs more than the decoding, ~3x the time for a 49k-token vocabulary)."""
        offsets, buf = self._data.tolist(), self._buf
        try:
            for i in range(len(offsets) - 1):
                yield buf[offsets[i] + 8:offsets[i + 1]].decode("utf-8")
        except UnicodeDecodeError:
            self._string(i)  # raises the file's error for entry i
            raise

    def _string(self, i: int) -> str:
        start, end = int(self._data[i]) + 8, int(self._data[i + 1])
        try:
            return self._buf[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.what}[{i}] is not valid UTF-8 ({exc.reason}): the file is corrupt;"
                            " download it again") from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.kind not in ("number", "bool"):
            raise TypeError(f"{self.what} is an array of {self.kind}s, not of numbers")
        values = self._data != 0 if self.kind == "bool" else self._data
        return values if dtype is None else values.astype(dtype)

    def tolist(self) -> list:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (GGUFArray, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<GGUFArray of {len(self)} {self.kind}s: {self.what}>"


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)
        self.objects = 0  # Python objects made for the metadata so far (see MAX_OBJECTS)

    def count_object(self, what: str) -> None:
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise self.fail(f"{what}: more than {MAX_OBJECTS} metadata entries and nested arrays")

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte {self.pos}); the file is corrupt or truncated: "
                         "download it again")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth < MAX_NESTING:
            return self.array(what, depth + 1)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> GGUFArray:
        itype = self.scalar("I", what)
        n = self.scalar("Q", what)
        if itype not in _SCALARS and itype not in (_STRING, _ARRAY):
            raise self.fail(f"{what} is an array of unknown value type {itype}")
        smallest = struct.calcsize("<" + _SCALARS[itype]) if itype in _SCALARS else 8  # string/array: a u64 length
        if n > MAX_ARRAY_LEN or n * smallest > self.size - self.pos:
            raise self.fail(f"{what} claims {n} array elements, more than the file can hold")
        label = f"{self.path}: {what}"
        if itype in _NP_SCALARS:
            dtype = np.dtype(_NP_SCALARS[itype])
            values = np.frombuffer(self.buf, dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            return GGUFArray(label, "bool" if itype == 7 else "number", values)
        if itype == _STRING:
            return GGUFArray(label, "string", self.string_offsets(n, what), self.buf)
        items = []
        for _ in range(n):
            self.count_object(what)
            items.append(self.value(itype, what, depth))
        return GGUFArray(label, "array", items)

    def string_offsets(self, n: int, what: str) -> np.ndarray:
        """Offsets of n consecutive strings (each: u64 length, bytes) and of their end; UTF-8 is
        checked when a string is read.  One tight loop: this is most of the time an open takes."""
        offsets = array("q")
        append, unpack, pos = offsets.append, _U64.unpack_from, self.pos
        try:
            for _ in range(n):
                append(pos)
                pos += 8 + unpack(self.buf, pos)[0]
        except (struct.error, OverflowError):  # a length field past the end of the file, or one
            pos = self.size + 1  # so large that the next offset does not fit in an int64
        if pos > self.size:
            raise self.fail(f"{what}: its {n} strings run past the end of the file")
        append(pos)
        self.pos = pos
        return np.frombuffer(offsets, dtype=np.int64)


class GGUFFile:
    """An open, validated GGUF file; see module docstring."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path = path
        self.mapping = buf  # the mmap every view points into
        self.bytes = np.frombuffer(buf, dtype=np.uint8)  # the whole file, read-only
        cur = _Cursor(buf, path)
        self.version, n_tensors, n_kv = _header(cur)
        self.metadata: dict[str, Any] = _metadata(cur, n_kv)
        self.alignment = _alignment(cur, self.metadata)
        infos = _tensor_infos(cur, n_tensors)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorView] = {info[0]: self._view(cur, *info) for info in infos}

    def _view(self, cur: _Cursor, name: str, qtype: GGMLQuantizationType, shape: tuple, offset: int) -> TensorView:
        if offset % self.alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {self.alignment}")
        nbytes = quants.row_bytes(qtype, shape[-1]) * int(np.prod(shape[:-1], dtype=np.int64))
        start = self.data_offset + offset
        if start + nbytes > len(self.bytes):
            raise cur.fail(f"tensor {name!r} ({nbytes} bytes at {start}) runs past the end of the file "
                           f"({len(self.bytes)} bytes)")
        return TensorView(name, qtype, shape, self.bytes[start : start + nbytes])

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture string in the metadata: not a model file")
        return arch

    @cached_property
    def config(self) -> ModelConfig:
        return config_from_gguf(self.metadata, self.tensors, self.path)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def _header(cur: _Cursor) -> tuple[int, int, int]:
    cur.need(24, "the GGUF header")
    if cur.buf[0:4] != MAGIC:
        raise GGUFError(f"{cur.path}: not a GGUF file (magic {bytes(cur.buf[0:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar("I", "version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise GGUFError(f"{cur.path}: GGUF version {version}{hint} is not supported (2 and 3 are): "
                        "convert the model with a current llama.cpp")
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
    remaining = cur.size - cur.pos
    if n_kv * 13 > remaining or n_tensors * 29 > remaining:  # smallest possible entries
        raise cur.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in {remaining} bytes")
    if n_kv > MAX_OBJECTS or n_tensors > MAX_TENSORS:
        raise cur.fail(f"{n_kv} metadata entries and {n_tensors} tensors: more than the {MAX_OBJECTS} and"
                       f" {MAX_TENSORS} a model file has")
    return version, n_tensors, n_kv


def _metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        cur.count_object(f"metadata key {key!r}")
        metadata[key] = cur.value(cur.scalar("I", f"type of {key!r}"), f"metadata {key!r}")
    return metadata


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise cur.fail(f"general.alignment {align!r} is not a power of two")
    return align


def _tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple[str, GGMLQuantizationType, tuple[int, ...], int]]:
    infos, seen = [], set()
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        if name in seen or not name:
            raise cur.fail(f"tensor name {name!r} is empty or appears twice")
        seen.add(name)
        n_dims = cur.scalar("I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [cur.scalar("Q", f"dimensions of {name!r}") for _ in range(n_dims)]
        if min(dims) < 1 or np.prod([float(d) for d in dims]) > cur.size * 256.0:
            raise cur.fail(f"tensor {name!r} has impossible dimensions {dims}")
        raw_type = cur.scalar("I", f"type of {name!r}")
        offset = cur.scalar("Q", f"offset of {name!r}")
        qtype = _qtype(cur, name, raw_type, dims[0])
        infos.append((name, qtype, tuple(reversed(dims)), offset))
    return infos


def _qtype(cur: _Cursor, name: str, raw_type: int, inner: int) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw_type)
        quants.row_bytes(qtype, inner)
    except (ValueError, QuantError) as exc:
        raise cur.fail(f"tensor {name!r}: {exc}") from None
    return qtype


def _byte_size(f) -> int:
    """Size of a regular file or of a block device (whose st_size is 0), e.g. a model disk in the VM."""
    st = os.fstat(f.fileno())
    if stat.S_ISBLK(st.st_mode):
        return f.seek(0, os.SEEK_END)
    return st.st_size


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Map and validate a GGUF file; raises GGUFError if it is not a usable one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = _byte_size(f)
            if size < 24:
                raise GGUFError(f"{path}: {size} bytes is too short for a GGUF file: the download is incomplete")
            buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise GGUFError(f"cannot open {path}: {exc.strerror}: check the path") from exc
    return GGUFFile(path, buf)
