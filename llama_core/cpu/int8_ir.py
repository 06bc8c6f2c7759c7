"""LLVM IR building blocks for the integer dot products of `int8_dot` (8-bit activations).

numba compiles Python to LLVM IR, and LLVM does not turn an integer dot product written in
Python into the AVX2 instructions that make it fast (`vpmaddubsw`: 32 unsigned x signed byte
products summed in pairs to 16-bit lanes; `vpmaddwd`: 16-bit pairs summed to 32-bit lanes).
`int8_dot` therefore writes its loops as IR through numba's `@intrinsic`, with these helpers.

On a CPU with AVX2 the two products are the x86 intrinsics themselves; elsewhere they are plain
vector IR with the same results.  The two agree exactly for every input the kernels give them:
`vpmaddubsw` saturates to int16, which 2 x 63 x 127 (the largest weight code times the largest
activation, twice) never reaches.  numba keys its on-disk cache by the CPU, so machine code
made for one never runs on the other.
"""

from __future__ import annotations

from typing import Any

from llvmlite import binding as llb
from llvmlite import ir
from llvmlite.ir import instructions as ir_instructions
from numba.core import cgutils, config

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()
# CPUs (LLVM names) with AVX2, for a target named by NUMBA_CPU_NAME (the guest image pins "haswell")
_AVX2_CPUS = {"haswell", "broadwell", "skylake", "skylake-avx512", "cascadelake", "cooperlake", "cannonlake",
              "icelake-client", "icelake-server", "tigerlake", "alderlake", "raptorlake", "meteorlake",
              "sapphirerapids", "emeraldrapids", "graniterapids", "znver1", "znver2", "znver3", "znver4",
              "znver5", "x86-64-v3", "x86-64-v4"}


def _target_has_avx2() -> bool:
    """Whether the CPU numba compiles for has AVX2: the host's, or NUMBA_CPU_NAME/_FEATURES'."""
    name, features = getattr(config, "CPU_NAME", None), getattr(config, "CPU_FEATURES", None) or ""
    if name and name != "host":
        return ("+avx2" in features) or (name in _AVX2_CPUS and "-avx2" not in features)
    return bool(llb.get_host_cpu_features().get("avx2", False))


HAS_AVX2 = _target_has_avx2()


def vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def splat(t: ir.Type, n: int, value: Any) -> ir.Constant:
    return ir.Constant(vec(t, n), [value] * n)


def data_ptr(context: Any, builder: ir.IRBuilder, arrty: Any, arr: Any) -> ir.Value:
    """The i8* to element 0 of a numba array argument."""
    a = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(a.data, I8.as_pointer())


def load(builder: ir.IRBuilder, base: ir.Value, off: ir.Value, t: ir.Type) -> ir.Value:
    """A `t` read from byte `off` of `base` (unaligned)."""
    p = builder.bitcast(builder.gep(base, [off]), t.as_pointer())
    v = builder.load(p)
    v.align = 1
    return v


class _VolatileLoad(ir_instructions.LoadInstr):
    """`load volatile` (llvmlite's builder has no volatile flag)."""

    def descr(self, buf: list[str]) -> None:
        super().descr(buf)
        buf[-1] = buf[-1].replace("load ", "load volatile ", 1)


def halves(builder: ir.IRBuilder, base: ir.Value, off: ir.Value) -> tuple[ir.Value, ir.Value]:
    """The two IEEE halves at bytes off..off+3, as floats.

    Read as one volatile 32-bit load (a `vmovd`, which clears the rest of its register).  LLVM
    narrows a plain load to the 16 bits used and makes it a `vpinsrw` into whatever register it
    picks, often the loop's accumulator: that dependency chained every block of a row behind the
    previous block's multiply-add (measured ~18 cycles a block); volatile keeps the full load."""
    p = builder.bitcast(builder.gep(base, [off]), I32.as_pointer())
    word = _VolatileLoad(builder.block, p)
    word.align = 1
    builder._insert(word)
    pair = builder.fpext(builder.bitcast(word, vec(F16, 2)), vec(F32, 2))
    return builder.extract_element(pair, const(I32, 0)), builder.extract_element(pair, const(I32, 1))


def half(builder: ir.IRBuilder, base: ir.Value, off: ir.Value) -> ir.Value:
    """The IEEE half at byte `off` (two more bytes must follow it), as float."""
    return halves(builder, base, off)[0]


def const(t: ir.Type, v: int) -> ir.Constant:
    return ir.Constant(t, v)


def nibbles(builder: ir.IRBuilder, packed: ir.Value) -> ir.Value:
    """<16 x i8> packed nibbles -> <32 x i8>: low nibbles (elements 0-15), then high (16-31)."""
    lo = builder.and_(packed, splat(I8, 16, 15))
    hi = builder.lshr(packed, splat(I8, 16, 4))
    return builder.shuffle_vector(lo, hi, ir.Constant(vec(I32, 32), list(range(32))))


def nibbles32(builder: ir.IRBuilder, packed: ir.Value, high: bool) -> ir.Value:
    """<32 x i8> -> its 32 low (or high) nibbles."""
    if high:
        return builder.lshr(packed, splat(I8, 32, 4))
    return builder.and_(packed, splat(I8, 32, 15))


def bits_to_bytes(builder: ir.IRBuilder, bits: ir.Value, value: int) -> ir.Value:
    """i32 bit mask -> <32 x i8> with `value` in element e where bit e is set, else 0."""
    bytes4 = builder.bitcast(bits, vec(I8, 4))
    spread = builder.shuffle_vector(bytes4, bytes4, ir.Constant(vec(I32, 32), [e // 8 for e in range(32)]))
    hit = builder.and_(spread, ir.Constant(vec(I8, 32), [1 << (e % 8) for e in range(32)]))
    on = builder.icmp_unsigned("!=", hit, splat(I8, 32, 0))
    return builder.select(on, splat(I8, 32, value), splat(I8, 32, 0))


def _intrinsic(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _pair_sums(builder: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """<n x iK> -> <n/2 x iK>: element i = v[2i] + v[2i + 1]."""
    even = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(vec(I32, n // 2), list(range(1, n, 2))))
    return builder.add(even, odd)


def maddubs(builder: ir.IRBuilder, u: ir.Value, s: ir.Value) -> ir.Value:
    """<32 x i8> unsigned u, signed s -> <16 x i16>: u[2i] s[2i] + u[2i+1] s[2i+1]."""
    if HAS_AVX2:
        return _intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), [u, s])
    prod = builder.mul(builder.zext(u, vec(I16, 32)), builder.sext(s, vec(I16, 32)))
    return _pair_sums(builder, prod, 32)


def maddwd(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """<16 x i16> a, b -> <8 x i32>: a[2i] b[2i] + a[2i+1] b[2i+1]."""
    if HAS_AVX2:
        return _intrinsic(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [a, b])
    prod = builder.mul(builder.sext(a, vec(I32, 16)), builder.sext(b, vec(I32, 16)))
    return _pair_sums(builder, prod, 16)


def sign_dot(builder: ir.IRBuilder, w: ir.Value, a: ir.Value) -> ir.Value:
    """<32 x i8> signed w and a -> <16 x i16> pair sums of w * a (|w| times a with w's sign)."""
    if HAS_AVX2:
        aw = _intrinsic(builder, "llvm.x86.avx2.psign.b", vec(I8, 32), [w, w])
        sa = _intrinsic(builder, "llvm.x86.avx2.psign.b", vec(I8, 32), [a, w])
        return maddubs(builder, aw, sa)
    prod = builder.mul(builder.sext(w, vec(I16, 32)), builder.sext(a, vec(I16, 32)))
    return _pair_sums(builder, prod, 32)


def widen_sum(builder: ir.IRBuilder, p16: ir.Value, weights: ir.Value | None = None) -> ir.Value:
    """<16 x i16> -> <8 x i32> pair sums (times per-lane int16 `weights` when given)."""
    return maddwd(builder, p16, weights if weights is not None else splat(I16, 16, 1))


def to_float(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return builder.sitofp(v, vec(F32, 8))


def bcast(builder: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    """A scalar in all n lanes."""
    s = builder.insert_element(ir.Constant(vec(v.type, n), ir.Undefined), v, const(I32, 0))
    return builder.shuffle_vector(s, s, ir.Constant(vec(I32, n), [0] * n))


def fma(builder: ir.IRBuilder, scale: ir.Value, v: ir.Value, acc: ir.Value) -> ir.Value:
    """acc + scale * v, fused (one rounding, as `_mm256_fmadd_ps`), for a float scalar `scale`
    and float vectors v, acc; `llvm.fma` fixes the rounding where fast-math flags would let
    LLVM choose (and reassociate)."""
    n = v.type.count
    return _intrinsic(builder, f"llvm.fma.v{n}f32", vec(F32, n), [bcast(builder, scale, n), v, acc])


def hsum4(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """(v0 + v2) + (v1 + v3): the order of llama.cpp's 4-lane horizontal sums."""
    lo = builder.shuffle_vector(v, v, ir.Constant(vec(I32, 2), [0, 1]))
    hi = builder.shuffle_vector(v, v, ir.Constant(vec(I32, 2), [2, 3]))
    p = builder.fadd(lo, hi)
    return builder.fadd(builder.extract_element(p, const(I32, 0)), builder.extract_element(p, const(I32, 1)))


def hsum8(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The sum of <8 x float> v's lanes: high half onto low, then `hsum4`."""
    lo = builder.shuffle_vector(v, v, ir.Constant(vec(I32, 4), list(range(4))))
    hi = builder.shuffle_vector(v, v, ir.Constant(vec(I32, 4), list(range(4, 8))))
    return hsum4(builder, builder.fadd(hi, lo))


class Accumulators:
    """Loop-carried values as stack slots (LLVM's mem2reg makes them registers)."""

    def __init__(self, builder: ir.IRBuilder, **init: ir.Value) -> None:
        self._b = builder
        self._slots = {k: cgutils.alloca_once_value(builder, v) for k, v in init.items()}

    def __getitem__(self, k: str) -> ir.Value:
        return self._b.load(self._slots[k])

    def __setitem__(self, k: str, v: ir.Value) -> None:
        self._b.store(v, self._slots[k])
