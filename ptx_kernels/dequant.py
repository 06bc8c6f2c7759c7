"""Per-qtype weight parameters, constexprs and limits shared by the mat-vec, GEMM and embedding
kernels, and `load_weights`: element-wise dequantization from the repacked layout (repack.py)
for gathers such as embedding rows (mat-vec and GEMM load whole runs instead)."""

from __future__ import annotations

import triton
import triton.language as tl

from .repack import FORMATS

KIND_CODES = {"nibble": 0, "int8": 1, "float": 2}

# Triton pointer types of the q / s (and m) planes per qtype.
_Q_TYPE = {"nibble": "*u8", "int8": "*i8"}
_FLOAT_Q = {"F16": "*fp16", "F32": "*fp32"}
_S_TYPE = {"float16": "*fp16", "float32": "*fp32"}


def weight_params(qtype: str) -> tuple[tuple[str, str], ...]:
    """(name, triton type) of the three weight planes for one qtype."""
    fmt = FORMATS[qtype]
    if fmt.kind == "float":
        return (("w_q", _FLOAT_Q[qtype]), ("w_s", "*fp32"), ("w_m", "*fp32"))
    st = _S_TYPE[fmt.scale_dtype]
    return (("w_q", _Q_TYPE[fmt.kind]), ("w_s", st), ("w_m", st))


def weight_constexprs(qtype: str) -> dict:
    fmt = FORMATS[qtype]
    # float weights have no scales: GROUP only sets the run length the mat-vec loads at once
    return {"KIND": KIND_CODES[fmt.kind], "HAS_MIN": fmt.has_min, "GROUP": fmt.group or 32}


def unused_planes(qtype: str) -> tuple[str, ...]:
    fmt = FORMATS[qtype]
    if fmt.kind == "float":
        return ("w_s", "w_m")
    return () if fmt.has_min else ("w_m",)


def weight_limits(qtype: str, cols: str) -> tuple[str, ...]:
    """Launch limits on the column count `cols` of a weight of this qtype."""
    fmt = FORMATS[qtype]
    return (f"{cols} % {max(fmt.block_elems, 32)} == 0",)


@triton.jit
def load_weights(q_ptr, s_ptr, m_ptr, rows, cols, K, mask,
                 KIND: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr):
    """Weights w[rows, cols] of a (N, K) repacked weight as float32; rows/cols broadcast."""
    if KIND == 0:
        byte = rows * (K // 2) + (cols // 32) * 16 + cols % 16
        b = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
        q = (b >> (((cols // 16) % 2) * 4)) & 15
    else:
        q = tl.load(q_ptr + rows * K + cols, mask=mask, other=0)
    w = q.to(tl.float32)
    if KIND != 2:
        grp = rows * (K // GROUP) + cols // GROUP
        w = w * tl.load(s_ptr + grp, mask=mask, other=0).to(tl.float32)
        if HAS_MIN:
            w = w + tl.load(m_ptr + grp, mask=mask, other=0).to(tl.float32)
    return w
