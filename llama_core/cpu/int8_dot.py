"""Dot products of one GGUF weight row with activations rounded to 8 bits, as numba intrinsics.

    dot(w, wo, nb, aq, ao, af, fo) -> float32

w: uint8 bytes holding the row at byte `wo` (nb blocks); aq: the int8 activation codes, this
row's first at `ao`; af: their float32 block data from `fo` (see `int8_act`).  The block loop is
LLVM IR (`int8_ir`): per 32 weights one `vpmaddubsw` and one `vpmaddwd` on AVX2, the integer
sums scaled and added into eight float lanes once per block (per super-block for the K types),
one horizontal sum per row.

The arithmetic is llama.cpp's for the same pair of formats (its CPU `vec_dot` functions): exact
integer products within a block, times the two block scales, in float32.  Which activation
format each weight format takes:

    Q4_0, Q5_0, Q8_0  x  Q8_0 (per 32: d, lane sums)   Q8_0: signed dot; Q4_0/Q5_0: unsigned codes,
                                                       less 8/16 x the activations' lane sums
    Q4_1, Q5_1        x  Q8_1 (per 32: d, s)            unsigned codes; + m * s per block
    Q4_K, Q6_K        x  Q8_K (per 256: d, 16 sums of 16 codes)
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ukgpu.llama_core.cpu.int8_ir import (
    F32,
    I8,
    I16,
    I32,
    I64,
    Accumulators,
    bits_to_bytes,
    const,
    data_ptr,
    fma,
    half,
    halves,
    hsum4,
    hsum8,
    load,
    maddubs,
    nibbles,
    nibbles32,
    sign_dot,
    splat,
    to_float,
    vec,
    widen_sum,
)


class _Row:
    """The pointers and offsets of one row's dot product, inside a codegen."""

    def __init__(self, context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> None:
        b = self.b = builder
        self.w = data_ptr(context, builder, sig.args[0], args[0])
        self.aq = data_ptr(context, builder, sig.args[3], args[3])
        self.af = data_ptr(context, builder, sig.args[5], args[5])
        self.wo, self.nb, self.ao, self.fo = (b.sext(a, I64) if a.type != I64 else a
                                             for a in (args[1], args[2], args[4], args[6]))
        self.acc = Accumulators(builder, v=splat(F32, 8, 0.0), s=ir.Constant(F32, 0.0), m=splat(F32, 4, 0.0))
        self.extra = ""  # what the blocks add beside the 8 lanes: "s" (a scalar), "m" (4 lanes)

    def off(self, base: ir.Value, i: ir.Value, stride: int, plus: int = 0) -> ir.Value:
        return self.b.add(base, self.b.add(self.b.mul(i, const(I64, stride)), const(I64, plus)))

    def w_at(self, wb: ir.Value, plus: int, t: ir.Type) -> ir.Value:
        return load(self.b, self.w, self.b.add(wb, const(I64, plus)), t)

    def codes(self, ab: ir.Value, plus: int = 0) -> ir.Value:
        return load(self.b, self.aq, self.b.add(ab, const(I64, plus)), vec(I8, 32))

    def act_float(self, i: ir.Value, stride: int, plus: int = 0) -> ir.Value:
        byte = self.b.mul(self.off(self.fo, i, stride, plus), const(I64, 4))
        return load(self.b, self.af, byte, F32)

    def add_block(self, scale: ir.Value, isum: ir.Value) -> None:
        self.add_block_f(scale, to_float(self.b, isum))

    def add_block_f(self, scale: ir.Value, sums: ir.Value) -> None:
        self.acc["v"] = fma(self.b, scale, sums, self.acc["v"])

    def add_scalar(self, v: ir.Value) -> None:
        self.extra = "s"
        self.acc["s"] = self.b.fadd(self.acc["s"], v)

    def add_lanes4(self, scale: ir.Value, isum4: ir.Value) -> None:
        self.extra = "m"
        self.acc["m"] = fma(self.b, scale, self.b.sitofp(isum4, vec(F32, 4)), self.acc["m"])

    def result(self) -> ir.Value:
        total = hsum8(self.b, self.acc["v"])
        if self.extra == "s":
            return self.b.fadd(total, self.acc["s"])
        if self.extra == "m":
            return self.b.fadd(total, hsum4(self.b, self.acc["m"]))
        return total


def _row_dot(block):
    """An intrinsic running `block(row, i)` for each block i of the row, then the row's sum."""

    def typer(typingctx, w, wo, nb, aq, ao, af, fo):
        def codegen(context, builder, sig, args):
            row = _Row(context, builder, sig, args)
            with cgutils.for_range(builder, row.nb) as loop:
                block(row, loop.index)
            return row.result()

        return types.float32(w, wo, nb, aq, ao, af, fo), codegen

    typer.__name__ = block.__name__.lstrip("_")
    return intrinsic(typer)


def _blocks32(row: _Row, i: ir.Value, nbytes: int, has_m: bool, fifth: bool) -> None:
    """One block of Q4_0 / Q4_1 / Q5_0 / Q5_1 (d f16, [m f16], [qh u32], qs[16]; qs ends it)."""
    b, wb = row.b, row.off(row.wo, i, nbytes)
    q = nibbles(b, row.w_at(wb, nbytes - 16, vec(I8, 16)))
    if fifth:
        q = b.or_(q, bits_to_bytes(b, row.w_at(wb, nbytes - 20, I32), 16))
    a = row.codes(row.off(row.ao, i, 32))
    d, m = halves(b, row.w, wb)
    dd = b.fmul(d, row.act_float(i, 2 if has_m else 9))
    sums = to_float(b, widen_sum(b, maddubs(b, q, a)))  # unsigned codes
    if has_m:  # plus m times the activations' block sum s
        row.add_block_f(dd, sums)
        row.add_scalar(b.fmul(m, row.act_float(i, 2, 1)))
    else:  # codes q - 16 (q - 8): the lanes' integer sums less 16 (8) times the activation lanes',
        # exactly llama.cpp's signed lane sums (every value an integer far below 2^24)
        lanes = load(b, row.af, b.mul(row.off(row.fo, i, 9, 1), const(I64, 4)), vec(F32, 8))
        if not fifth:
            lanes = b.fmul(lanes, splat(F32, 8, 0.5))
        row.add_block_f(dd, b.fsub(sums, lanes))


@_row_dot
def _dot_q4_0(row, i):
    _blocks32(row, i, 18, False, False)


@_row_dot
def _dot_q4_1(row, i):
    _blocks32(row, i, 20, True, False)


@_row_dot
def _dot_q5_0(row, i):
    _blocks32(row, i, 22, False, True)


@_row_dot
def _dot_q5_1(row, i):
    _blocks32(row, i, 24, True, True)


@_row_dot
def _dot_q8_0(row, i):
    b, wb = row.b, row.off(row.wo, i, 34)
    p = sign_dot(b, row.w_at(wb, 2, vec(I8, 32)), row.codes(row.off(row.ao, i, 32)))
    row.add_block(b.fmul(half(b, row.w, wb), row.act_float(i, 9)), widen_sum(b, p))


def _bcast16(b: ir.IRBuilder, v: ir.Value, lanes: list[int]) -> ir.Value:
    """Scalars (i16) -> <16 x i16>, lane j taking v[lanes[j]]."""
    vv = ir.Constant(vec(I16, len(v)), ir.Undefined)
    for k, s in enumerate(v):
        vv = b.insert_element(vv, s, const(I32, k))
    return b.shuffle_vector(vv, vv, ir.Constant(vec(I32, 16), lanes))


def _k4_scales(b: ir.IRBuilder, row: _Row, wb: ir.Value) -> tuple[list[ir.Value], list[ir.Value]]:
    """Q4_K's eight six-bit (scale, min) pairs, as i16, from its 12 packed bytes at byte 4."""
    s = [b.zext(row.w_at(wb, 4 + j, I8), I16) for j in range(12)]
    c63, c15, c4, c6 = (const(I16, v) for v in (63, 15, 4, 6))
    sc = [b.and_(s[j], c63) for j in range(4)]
    mn = [b.and_(s[j + 4], c63) for j in range(4)]
    sc += [b.or_(b.and_(s[j + 8], c15), b.shl(b.lshr(s[j], c6), c4)) for j in range(4)]
    mn += [b.or_(b.lshr(s[j + 8], c4), b.shl(b.lshr(s[j + 4], c6), c4)) for j in range(4)]
    return sc, mn


@_row_dot
def _dot_q4_k(row, i):
    """Super-block (144 B): d, dmin, scales[12], qs[128]; chunk c of qs: sub-blocks 2c, 2c+1."""
    b, wb = row.b, row.off(row.wo, i, 144)
    ab = row.off(row.ao, i, 256)
    sc, mn = _k4_scales(b, row, wb)
    isum = splat(I32, 8, 0)
    for c in range(4):
        v = row.w_at(wb, 16 + 32 * c, vec(I8, 32))
        for hi in (0, 1):
            p = maddubs(b, nibbles32(b, v, bool(hi)), row.codes(ab, 64 * c + 32 * hi))
            isum = b.add(isum, widen_sum(b, p, _bcast16(b, [sc[2 * c + hi]], [0] * 16)))
    d, dmin = halves(b, row.w, wb)
    da = row.act_float(i, 17)
    row.add_block(b.fmul(da, d), isum)
    lanes = ir.Constant(vec(I32, 4), ir.Undefined)
    for j in range(4):
        pair = [b.mul(b.sext(mn[k], I32), b.fptosi(b.fadd(row.act_float(i, 17, 1 + 2 * k),
                                                          row.act_float(i, 17, 2 + 2 * k)), I32))
                for k in (2 * j, 2 * j + 1)]
        lanes = b.insert_element(lanes, b.add(*pair), const(I32, j))
    row.add_lanes4(b.fmul(b.fneg(da), dmin), lanes)


@_row_dot
def _dot_q6_k(row, i):
    """Super-block (210 B): ql[128], qh[64], scales int8[16], d; codes 0..63, value q - 32."""
    b, wb = row.b, row.off(row.wo, i, 210)
    ab = row.off(row.ao, i, 256)
    isum = splat(I32, 8, 0)
    for h in range(2):
        ql = [row.w_at(wb, 64 * h + 32 * k, vec(I8, 32)) for k in (0, 1)]
        qh = row.w_at(wb, 128 + 32 * h, vec(I8, 32))
        for c in range(4):
            hb = b.shl(b.and_(b.lshr(qh, splat(I8, 32, 2 * c)), splat(I8, 32, 3)), splat(I8, 32, 4))
            q = b.or_(nibbles32(b, ql[c % 2], c >= 2), hb)
            a = row.codes(ab, 128 * h + 32 * c)
            p = b.sub(maddubs(b, q, a), maddubs(b, splat(I8, 32, 32), a))
            scales = [b.sext(row.w_at(wb, 192 + 8 * h + 2 * c + k, I8), I16) for k in (0, 1)]
            isum = b.add(isum, widen_sum(b, p, _bcast16(b, scales, [0] * 8 + [1] * 8)))
    d = halves(b, row.w, b.add(wb, const(I64, 206)))[1]  # d ends the block: read it with the bytes before
    row.add_block(b.fmul(d, row.act_float(i, 17)), isum)


dot_q4_0, dot_q4_1, dot_q5_0, dot_q5_1, dot_q8_0 = _dot_q4_0, _dot_q4_1, _dot_q5_0, _dot_q5_1, _dot_q8_0
dot_q4_k, dot_q6_k = _dot_q4_k, _dot_q6_k
