"""Quantizers of Q5_K, Q3_K and Q2_K (gguf-py has none): min/max (or absmax) per sub-block, not
ggml's error search, which is fine for the synthetic weights the tests and benchmarks write.
Each returns ggml's blocks, so `quants.dequantize` (and gguf-py's) read them back; the packing
is the inverse of the unpacking in `quants` (`k4_scales`, `crumbs`, `Q3_K.scales6`)."""

from __future__ import annotations

import numpy as np


def _round_div(a: np.ndarray, b: np.ndarray, top: int) -> np.ndarray:
    q = np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)
    return np.clip(np.rint(q), 0, top).astype(np.uint8)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _fit_min(x: np.ndarray, q_top: int, s_top: int) -> tuple:
    """x [n, S, L] -> (d, dmin [n, 1] f32 of f16, sc, mn [n, S] u8, q [n, S, L] u8) with
    x ~ d*sc*q - dmin*mn: the min per sub-block (<= 0) and its range over q_top steps."""
    lo = np.minimum(x.min(axis=2), 0)
    scale = (x.max(axis=2) - lo) / np.float32(q_top)
    d, dmin = _f16(scale.max(axis=1, keepdims=True) / s_top), _f16(-lo.min(axis=1, keepdims=True) / s_top)
    sc, mn = _round_div(scale, d, s_top), _round_div(-lo, dmin, s_top)
    step, off = (d * sc)[:, :, None], (dmin * mn)[:, :, None]
    return d, dmin, sc, mn, _round_div(x + off, step, q_top)


def _crumb_bytes(q: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values -> qs [n, 64]: element 128h + 32j + l is bits 2j of qs[32h + l]."""
    g = q.reshape(len(q), 2, 4, 32).astype(np.uint8)
    return np.bitwise_or.reduce(g << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=2).reshape(len(q), 64)


def _bit_bytes(bits: np.ndarray) -> np.ndarray:
    """[n, 256] 0/1 -> [n, 32]: element 32j + l is bit j of byte l (Q5_K's qh, Q3_K's hmask)."""
    g = bits.reshape(len(bits), 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(g << np.arange(8, dtype=np.uint8)[:, None], axis=1)


def _pack(d: np.ndarray, fields: list[tuple[str, np.ndarray]], fmt) -> np.ndarray:
    """Blocks of `fmt` (a quants class) from its fields by name; d/dmin as float16."""
    out = np.zeros((len(d), fmt.block.nbytes), np.uint8)
    for name, arr in fields:
        fmt.field(out, name)[...] = arr.astype(fmt.field(out, name).dtype)
    return out


def quantize_q5_k(fmt, values: np.ndarray) -> np.ndarray:
    n = len(values)
    d, dmin, sc, mn, q = _fit_min(values.reshape(n, 8, 32), 31, 63)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    low = q.reshape(n, 4, 2, 32) & 15  # sub-block 2c: low nibbles of qs[32c:], 2c+1: high
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    return _pack(d, [("d", d), ("dmin", dmin), ("scales", scales), ("qh", _bit_bytes(q.reshape(n, 256) >> 4)),
                     ("qs", qs)], fmt)


def quantize_q2_k(fmt, values: np.ndarray) -> np.ndarray:
    n = len(values)
    d, dmin, sc, mn, q = _fit_min(values.reshape(n, 16, 16), 3, 15)
    return _pack(d, [("scales", sc | (mn << 4)), ("qs", _crumb_bytes(q.reshape(n, 256))), ("d", d),
                     ("dmin", dmin)], fmt)


def quantize_q3_k(fmt, values: np.ndarray) -> np.ndarray:
    """x ~ d * (s - 32) * (q - 4), q in 0..7: as ggml, the sub-block's largest |x| maps to q - 4 = -4
    (the sub-scale takes its sign), s - 32 in -31..31."""
    n = len(values)
    x = values.reshape(n, 16, 16)
    big = np.take_along_axis(x, np.abs(x).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]  # [n, 16]
    scale = -big / np.float32(4)
    d = _f16(np.abs(scale).max(axis=1, keepdims=True) / 31)
    sc = np.clip(np.rint(np.divide(scale, d, out=np.zeros_like(scale), where=d != 0)), -31, 31)
    step = (d * sc)[:, :, None]
    q = np.divide(x, step, out=np.zeros_like(x), where=step != 0)
    q = np.clip(np.rint(q) + 4, 0, 7).astype(np.uint8).reshape(n, 256)
    s = (sc + 32).astype(np.uint8)
    top = (s.reshape(n, 4, 4) >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]  # [n, 4 (shift), 4 (byte)]
    scales = np.concatenate([(s[:, :8] & 15) | ((s[:, 8:] & 15) << 4), np.bitwise_or.reduce(top, axis=1)], axis=1)
    return _pack(d, [("hmask", _bit_bytes(q >> 2)), ("qs", _crumb_bytes(q & 3)), ("scales", scales), ("d", d)], fmt)
