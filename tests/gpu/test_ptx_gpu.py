"""Every kernel artifact run on the GPU through the backend's launcher (`gpu.cuda.modules.KernelSet`
over `open_device`'s context and stream), compared with its numpy reference.  Runs twice per
family: the best artifact for the device (the sm_90a cubin on H100/H200) and the portable sm_80
PTX through the driver's JIT (`KernelSet(force_ptx="sm_80")`).  Each test gets a fresh device
arena (`ARENA_BYTES`), freed after it; `verify_checks.Device` uploads and reads back.

Skips with the reason when cuda-python, the driver or a GPU is missing.
Bounds (FMA and libdevice math on the GPU): f32 mat-vec 1e-4 * (|x| @ |W|.T); f16 GEMM
4e-3 * (|x| @ |W|.T); elementwise 1e-5 relative; rope 1e-5 * |x|; attention decode 1e-3 * max|v|,
prefill 1e-2 * max|v|; embedding 1e-6 relative; argmax and store_rows exact.  The kernels the
newer model families add (scaled rope tables with partial rotation and positions to 2^20,
head_dim 256, sliding windows, geglu, scale) have their own tests at the end, same bounds.
"""

import numpy as np
import pytest

from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.driver import CudaError, open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.gpu.cuda.verify_checks import Device
from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.repack import dequantize_repacked, get_format

pytestmark = pytest.mark.gpu

ARENA_BYTES = 64 << 20  # the largest test (argmax over 3 x 151936 logits) needs ~4 MiB


@pytest.fixture(scope="module", params=["best", "sm_80"])
def kernels(request):
    try:
        ctx = open_device(0)
    except CudaError as exc:  # no cuda-python, no driver library, no device: the error says which
        pytest.skip(f"no usable CUDA device: {exc}")
    return KernelSet(ctx, force_ptx=None if request.param == "best" else "sm_80")


@pytest.fixture
def gpu(kernels):
    arena = DeviceArena(kernels.cu, ARENA_BYTES)
    yield Device(kernels, arena)
    kernels.ctx.sync()
    arena.free()


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def _weights(gpu, w) -> dict:
    return {f"w_{k}": gpu.put(v) for k, v in w.planes().items()}


def _bound(x, w, rel):
    return rel * (np.abs(x).astype(np.float64) @ np.abs(dequantize_repacked(w)).astype(np.float64).T)


def _cols(qtype: str) -> int:
    return 768 if get_format(qtype).block_elems == 256 else 544  # ragged vs the K tiles


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("version,batch", [("b1", 1), ("b1", 2), ("b8", 8), ("b8", 3)])
def test_matvec(gpu, qtype, version, batch, rng):
    n, k = 301, _cols(qtype)
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    y = np.full((batch, n), np.nan, np.float32)
    dy = gpu.put(y)
    gpu.kernels.launch(f"matvec_{qtype.lower()}_{version}",
                       _weights(gpu, w) | {"x": gpu.put(x), "y": dy, "N": n, "K": k, "B": batch})
    err = np.abs(gpu.get(dy, y.shape, y.dtype) - R.matvec(w, x))
    assert np.all(err <= _bound(x, w, 1e-4) + 1e-30), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_split_k_down_projection_is_deterministic(gpu, qtype, rng):
    """`matvec_split_add` at the 1.5B down projection's shape (384 row blocks x 4 splits racing
    for their tickets), launched 8 times on the same input: the reference's values within the
    mat-vec bound, the same bits every time, the ticket words back at zero."""
    n, k, splits = 1536, 8960, 4
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    resid = rng.standard_normal((1, n)).astype(np.float32)
    args = _weights(gpu, w) | {"x": gpu.put(x), "part": gpu.put(np.zeros((splits, n), np.float32)),
                               "count": gpu.put(np.zeros(n // 4, np.int32)), "N": n, "K": k,
                               "splits": splits}
    outs = []
    for _ in range(8):
        dy = gpu.put(resid)
        gpu.kernels.launch(f"matvec_split_add_{qtype.lower()}_b1", args | {"y": dy})
        outs.append(gpu.get(dy, resid.shape, resid.dtype))
    err = np.abs(outs[0] - R.matvec_add(w, x, resid))
    assert np.all(err <= _bound(x, w, 1e-4) + 1e-6), f"max err {np.nanmax(err)}"
    assert all(np.array_equal(o, outs[0]) for o in outs[1:])
    assert not gpu.get(args["count"], (n // 4,), np.int32).any()


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_gemm(gpu, qtype, rng):
    m, n, k = 130, 200, _cols(qtype)
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = np.full((m, n), np.nan, np.float32)
    dy = gpu.put(y)
    gpu.kernels.launch(f"gemm_{qtype.lower()}",
                       _weights(gpu, w) | {"x": gpu.put(x), "y": dy, "M": m, "N": n, "K": k})
    err = np.abs(gpu.get(dy, y.shape, y.dtype) - R.matvec(w, x))
    assert np.all(err <= _bound(x, w, 4e-3)), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_embedding(gpu, qtype, rng):
    v, k = 40, _cols(qtype)
    w = R.random_repacked(qtype, v, k, rng)
    ids = np.array([0, v - 1, 5, 5, 17], np.int32)
    o = np.full((len(ids), k), np.nan, np.float32)
    do = gpu.put(o)
    gpu.kernels.launch(f"embedding_{qtype.lower()}",
                       _weights(gpu, w) | {"ids": gpu.put(ids), "out": do, "K": k, "T": len(ids)})
    np.testing.assert_allclose(gpu.get(do, o.shape, o.dtype), R.embedding(w, ids), rtol=1e-6, atol=1e-30)


def test_rmsnorm_swiglu_add_bias(gpu, rng):
    m, d = 5, 1536
    x = rng.standard_normal((m, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    y = np.full_like(x, np.nan)
    dy = gpu.put(y)
    gpu.kernels.launch("rmsnorm_f32", {"x": gpu.put(x), "weight": gpu.put(w), "y": dy,
                                       "D": d, "eps": 1e-6, "M": m})
    g, u = x.reshape(-1), np.roll(x.reshape(-1), 7)
    ds, da = gpu.put(np.full_like(g, np.nan)), gpu.put(np.full_like(g, np.nan))
    dg, du = gpu.put(g), gpu.put(u)
    gpu.kernels.launch("swiglu_f32", {"gate": dg, "up": du, "out": ds, "n": g.size})
    gpu.kernels.launch("add_f32", {"a": dg, "b": du, "out": da, "n": g.size})
    dx, dbias = gpu.put(x), gpu.put(w)
    gpu.kernels.launch("add_bias_f32", {"x": dx, "bias": dbias, "out": dx, "n": x.size, "N": d})
    np.testing.assert_allclose(gpu.get(dx, x.shape, x.dtype), R.add_bias(x, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gpu.get(dy, y.shape, y.dtype), R.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gpu.get(ds, g.shape, g.dtype), R.swiglu(g, u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.get(da, g.shape, g.dtype), R.add(g, u), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("hd", [64, 128])
def test_rope(gpu, mode, hd, rng):
    t, h, stride = 6, 4, 9 * hd
    x = rng.standard_normal((t, stride)).astype(np.float32)
    pos = np.array([0, 1, 2, 100, 2047, 4095], np.int32)
    y = np.full((t, h * hd), np.nan, np.float32)
    dy = gpu.put(y)
    freqs = 1e4 ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    gpu.kernels.launch(f"rope_{mode}_d{hd}", {"x": gpu.put(x), "y": dy, "pos": gpu.put(pos),
                                              "freqs": gpu.put(freqs), "stride_x": stride,
                                              "stride_y": h * hd, "head_dim": hd, "n_rot": hd,
                                              "mscale": 1.0, "T": t, "H": h})
    want = R.rope(x[:, : h * hd].reshape(t, h, hd), pos, 1e4, mode == "neox").reshape(t, -1)
    np.testing.assert_allclose(gpu.get(dy, y.shape, y.dtype), want, atol=1e-5 * np.abs(x).max(), rtol=0)


@pytest.mark.parametrize("hd", [32, 64, 96, 128])
def test_attention_prefill_and_decode(gpu, hd, rng):
    hq, hkv, n_slots, n_ctx = 12, 2, 3, 300
    k = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    v = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    dk, dv = gpu.put(k), gpu.put(v)
    scale = hd ** -0.5
    start, t = 40, 150  # a second prefill chunk of slot 1
    q = rng.standard_normal((t, hq, hd)).astype(np.float32)
    o = np.full_like(q, np.nan)
    do = gpu.put(o)
    slot_bytes = n_ctx * hkv * hd * 2
    gpu.kernels.launch(f"attn_prefill_d{hd}", {"q": gpu.put(q), "k_cache": dk + slot_bytes,
                                               "v_cache": dv + slot_bytes, "out": do, "T": t,
                                               "start": start, "Hq": hq, "Hkv": hkv, "scale": scale,
                                               "window": 0})
    slots, lens = np.array([2, 0, 1], np.int32), np.array([1, 300, 129], np.int32)
    qd = rng.standard_normal((3, hq, hd)).astype(np.float32)
    od = np.full_like(qd, np.nan)
    dod = gpu.put(od)
    splits, chunk = 5, 64  # 5 * 64 >= n_ctx; row 0 leaves four splits empty
    dpo, dpml = gpu.arena.alloc(3 * hq * splits * hd * 4), gpu.arena.alloc(3 * hq * splits * 2 * 4)
    sizes = {"n_ctx": n_ctx, "chunk": chunk, "Hq": hq, "Hkv": hkv, "scale": scale, "window": 0,
             "B": 3, "S": splits}
    gpu.kernels.launch(f"attn_decode_d{hd}", sizes | {"q": gpu.put(qd), "k_cache": dk, "v_cache": dv,
                                                      "part_out": dpo, "part_ml": dpml,
                                                      "slots": gpu.put(slots), "lens": gpu.put(lens)})
    gpu.kernels.launch(f"attn_combine_d{hd}", sizes | {"part_out": dpo, "part_ml": dpml, "out": dod})
    want = R.attention(q, k[1, : start + t], v[1, : start + t], start + np.arange(t), scale)
    np.testing.assert_allclose(gpu.get(do, o.shape, o.dtype), want, atol=1e-2 * np.abs(v).max(), rtol=0)
    got = gpu.get(dod, od.shape, od.dtype)
    for i, (s, n) in enumerate(zip(slots, lens)):
        want = R.attention(qd[i : i + 1], k[s, :n], v[s, :n], np.array([n - 1]), scale)[0]
        np.testing.assert_allclose(got[i], want, atol=1e-3 * np.abs(v).max(), rtol=0)


def test_argmax_and_store_rows(gpu, rng):
    b, vocab = 3, 151936
    logits = rng.standard_normal((b, vocab)).astype(np.float32)
    logits[1, [7, 150000]] = 99.0
    out = np.full(b, -1, np.int32)
    dout = gpu.put(out)
    gpu.kernels.launch("argmax_f32", {"logits": gpu.put(logits), "out": dout, "V": vocab, "B": b})
    rows, width = np.array([5, 0, 9], np.int32), 2 * 128
    dst = np.full((10, width), 7.0, np.float16)
    src = rng.standard_normal((3, width)).astype(np.float32)
    ddst = gpu.put(dst)
    gpu.kernels.launch("store_rows_f16", {"src": gpu.put(src), "dst": ddst, "rows": gpu.put(rows),
                                          "W": width, "src_stride": width, "T": 3})
    np.testing.assert_array_equal(gpu.get(dout, out.shape, out.dtype), R.argmax(logits))
    np.testing.assert_array_equal(gpu.get(ddst, dst.shape, dst.dtype), R.store_rows(dst, src, rows))


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("d,hd,n_rot", [(256, 256, 256), (128, 96, 96), (64, 128, 64)])
def test_rope_scaled_table(gpu, mode, d, hd, n_rot, rng):
    t, h = 6, 4
    x = rng.standard_normal((t, h * hd)).astype(np.float32)
    pos = np.array([0, 5, 4095, 32767, 131071, 1 << 20], np.int32)
    freqs = 5e5 ** (-np.arange(0, n_rot, 2) / n_rot) / rng.uniform(1, 8, n_rot // 2)
    dx = gpu.put(x)
    gpu.kernels.launch(f"rope_{mode}_d{d}", {"x": dx, "y": dx, "pos": gpu.put(pos),
                                             "freqs": gpu.put(freqs), "stride_x": h * hd,
                                             "stride_y": h * hd, "head_dim": hd, "n_rot": n_rot,
                                             "mscale": 1.25, "T": t, "H": h})
    want = R.rope(x.reshape(t, h, hd), pos, 0.0, mode == "neox", freqs=freqs, n_rot=n_rot,
                  mscale=1.25).reshape(t, -1)
    np.testing.assert_allclose(gpu.get(dx, x.shape, x.dtype), want, atol=1.25e-5 * np.abs(x).max(),
                               rtol=0)


def test_geglu_scale_and_head_norm(gpu, rng):
    n = 70000
    g = (rng.standard_normal(n) * 6).astype(np.float32)
    g[:3] = [-100.0, 100.0, 0.0]
    u = rng.standard_normal(n).astype(np.float32)
    dg = gpu.put(g)
    gpu.kernels.launch("geglu_f32", {"gate": dg, "up": gpu.put(u), "out": dg, "n": n})
    ds = gpu.put(u)
    gpu.kernels.launch("scale_f32", {"x": ds, "out": ds, "n": n, "s": 25.3})
    x = rng.standard_normal((3 * 4, 256)).astype(np.float32)  # 3 tokens x 4 heads of 256
    w = rng.standard_normal(256).astype(np.float32)
    dy = gpu.put(np.full_like(x, np.nan))
    gpu.kernels.launch("rmsnorm_f32", {"x": gpu.put(x), "weight": gpu.put(w), "y": dy, "D": 256,
                                       "eps": 1e-6, "M": 12})
    np.testing.assert_allclose(gpu.get(dg, g.shape, g.dtype), R.geglu(g, u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.get(ds, u.shape, u.dtype), R.scale(u, 25.3), rtol=1e-6)
    np.testing.assert_allclose(gpu.get(dy, x.shape, x.dtype), R.rmsnorm(x, w, 1e-6), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("hd", [64, 256])
@pytest.mark.parametrize("window", [0, 1, 50, 512])
def test_attention_window_and_head_dim_256(gpu, hd, window, rng):
    hq, hkv, n_ctx, start, t = 8, 2, 320, 100, 150
    k = rng.standard_normal((1, n_ctx, hkv, hd)).astype(np.float16)
    v = rng.standard_normal((1, n_ctx, hkv, hd)).astype(np.float16)
    dk, dv = gpu.put(k), gpu.put(v)
    scale = 0.0625
    q = rng.standard_normal((t, hq, hd)).astype(np.float32)
    do = gpu.put(np.full_like(q, np.nan))
    gpu.kernels.launch(f"attn_prefill_d{hd}", {"q": gpu.put(q), "k_cache": dk, "v_cache": dv,
                                               "out": do, "T": t, "start": start, "Hq": hq,
                                               "Hkv": hkv, "scale": scale, "window": window})
    want = R.attention(q, k[0, : start + t], v[0, : start + t], start + np.arange(t), scale, window)
    np.testing.assert_allclose(gpu.get(do, q.shape, q.dtype), want, atol=1e-2 * np.abs(v).max(), rtol=0)
    lens, splits, chunk = np.array([start + t], np.int32), 5, 64
    qd = rng.standard_normal((1, hq, hd)).astype(np.float32)
    dod = gpu.put(np.full_like(qd, np.nan))
    dpo, dpml = gpu.arena.alloc(hq * splits * hd * 4), gpu.arena.alloc(hq * splits * 2 * 4)
    sizes = {"n_ctx": n_ctx, "chunk": chunk, "Hq": hq, "Hkv": hkv, "scale": scale,
             "window": window, "B": 1, "S": splits}
    gpu.kernels.launch(f"attn_decode_d{hd}", sizes | {"q": gpu.put(qd), "k_cache": dk, "v_cache": dv,
                                                      "part_out": dpo, "part_ml": dpml,
                                                      "slots": gpu.put(np.zeros(1, np.int32)),
                                                      "lens": gpu.put(lens)})
    gpu.kernels.launch(f"attn_combine_d{hd}", sizes | {"part_out": dpo, "part_ml": dpml, "out": dod})
    n = int(lens[0])
    want = R.attention(qd, k[0, :n], v[0, :n], np.array([n - 1]), scale, window)
    np.testing.assert_allclose(gpu.get(dod, qd.shape, qd.dtype), want, atol=1e-3 * np.abs(v).max(),
                               rtol=0)


def test_artifact_kind_matches_the_device(gpu):
    art = gpu.kernels.kernel("add_f32").artifact
    kind = f"{art.target}/{art.kind}"
    if gpu.kernels.force_ptx:
        assert kind == "sm_80/ptx"
    elif gpu.kernels.ctx.info.cc == (9, 0):
        assert kind == "sm_90a/cubin"
    else:
        assert kind.endswith("/ptx")
