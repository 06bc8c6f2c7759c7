"""The ggml block table: one entry per tensor type, keyed by gguf's `GGMLQuantizationType`.

A ggml tensor is a sequence of blocks; each block of `nbytes` bytes holds `elems` consecutive
elements of a row (rows never share a block).  `BLOCKS[qtype]` holds those two numbers and the
block's `fields`, `Field(name, offset, size, dtype)`: offset and size in bytes from the block
start, dtype the little-endian numpy type of the field's elements; the fields tile the block in
order.  `f16_scales` are the float16 scale fields of a quantized block (d, m, dmin).

This is the only place these facts are written.  The arithmetic on them is `quants` (one class
per type); the CPU kernels' tiled layout (cpu/tiled.py), the device layout
(ptx_kernels/repack.py) and the random test weights read their sizes and offsets here (and
`quants.row_bytes` the size of a row).  The table is data only (no numpy), kept apart from
`quants` so each stays one concern.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.errors import QuantError

HALF = "<f2"  # dtype of every float16 field


@dataclass(frozen=True)
class Field:
    name: str
    offset: int  # bytes from the block start
    size: int  # bytes
    dtype: str  # numpy dtype of the field's elements, e.g. "<f2", "u1", "i1", "<u4"


@dataclass(frozen=True)
class Block:
    """One ggml type's block: `elems` elements of a row in `nbytes` bytes, laid out as `fields`."""

    elems: int
    nbytes: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    @property
    def f16_scales(self) -> tuple[Field, ...]:
        """The float16 scale fields, in block order (none for F32/F16/BF16: one value per block)."""
        return tuple(f for f in self.fields if f.dtype == HALF) if self.elems > 1 else ()


def _block(elems: int, nbytes: int, *fields: tuple[str, int, str]) -> Block:
    """A Block from its fields in order, each (name, bytes, dtype); offsets follow from the order."""
    offsets = [0, *accumulate(size for _, size, _ in fields)]
    assert offsets[-1] == nbytes, f"fields of {fields} take {offsets[-1]} bytes, not {nbytes}"
    return Block(elems, nbytes, tuple(Field(n, o, size, dt) for (n, size, dt), o in zip(fields, offsets)))


BLOCKS: dict[T, Block] = {
    T.F32: _block(1, 4, ("x", 4, "<f4")),
    T.F16: _block(1, 2, ("x", 2, HALF)),
    T.BF16: _block(1, 2, ("x", 2, "<u2")),
    T.Q4_0: _block(32, 18, ("d", 2, HALF), ("qs", 16, "u1")),
    T.Q4_1: _block(32, 20, ("d", 2, HALF), ("m", 2, HALF), ("qs", 16, "u1")),
    T.Q5_0: _block(32, 22, ("d", 2, HALF), ("qh", 4, "<u4"), ("qs", 16, "u1")),
    T.Q5_1: _block(32, 24, ("d", 2, HALF), ("m", 2, HALF), ("qh", 4, "<u4"), ("qs", 16, "u1")),
    T.Q8_0: _block(32, 34, ("d", 2, HALF), ("qs", 32, "i1")),
    T.Q2_K: _block(256, 84, ("scales", 16, "u1"), ("qs", 64, "u1"), ("d", 2, HALF), ("dmin", 2, HALF)),
    T.Q3_K: _block(256, 110, ("hmask", 32, "u1"), ("qs", 64, "u1"), ("scales", 12, "u1"), ("d", 2, HALF)),
    T.Q4_K: _block(256, 144, ("d", 2, HALF), ("dmin", 2, HALF), ("scales", 12, "u1"), ("qs", 128, "u1")),
    T.Q5_K: _block(256, 176, ("d", 2, HALF), ("dmin", 2, HALF), ("scales", 12, "u1"), ("qh", 32, "u1"),
                   ("qs", 128, "u1")),
    T.Q6_K: _block(256, 210, ("ql", 128, "u1"), ("qh", 64, "u1"), ("scales", 16, "i1"), ("d", 2, HALF)),
}


def block_of(qtype: T) -> Block:
    """BLOCKS[qtype], or a QuantError that names the supported types."""
    try:
        return BLOCKS[T(qtype)]
    except (KeyError, ValueError):
        supported = ", ".join(t.name for t in BLOCKS)
        raise QuantError(
            f"ggml type {qtype!r} is not supported (supported: {supported}); use a model quantized to one of them"
        ) from None

