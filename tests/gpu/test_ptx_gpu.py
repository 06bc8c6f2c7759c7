"""Every kernel artifact loaded with cuda-python alone (cuModuleLoadData + cuLaunchKernel), run on
the GPU, compared with its numpy reference.  Runs twice per family: the best artifact for the
device (the sm_90a cubin on H100/H200) and the portable sm_80 PTX through the driver's JIT.

Skips with the reason when cuda-python, the driver or a GPU is missing.
Bounds (FMA and libdevice math on the GPU): f32 mat-vec 1e-4 * (|x| @ |W|.T); f16 GEMM
4e-3 * (|x| @ |W|.T); elementwise 1e-5 relative; rope 2e-3 * |x|; attention decode 1e-3 * max|v|,
prefill 1e-2 * max|v|; embedding 1e-6 relative; argmax and store_rows exact.
"""

import math

import numpy as np
import pytest

from ukgpu.ptx_kernels import reference as R
from ukgpu.ptx_kernels.repack import dequantize_repacked, get_format

pytestmark = pytest.mark.gpu


def _runner_or_skip(**kw):
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        pytest.skip(f"cuda-python is not installed ({exc}): pip install 'ukgpu[gpu]'")
    try:
        err, = driver.cuInit(0)
    except Exception as exc:  # libcuda.so itself missing: cuda-python raises its loader error
        pytest.skip(f"no NVIDIA driver library on this machine ({type(exc).__name__}: {exc})")
    if int(err) != 0:
        pytest.skip(f"no usable NVIDIA driver: cuInit returned {err}")
    err, count = driver.cuDeviceGetCount()
    if int(err) != 0 or count == 0:
        pytest.skip("no NVIDIA GPU visible to the CUDA driver")
    from ukgpu.ptx_kernels.cuda_launch import CudaRunner

    return CudaRunner(**kw)


@pytest.fixture(scope="module", params=["best", "sm_80"])
def gpu(request):
    run = _runner_or_skip(ptx_target=None if request.param == "best" else "sm_80")
    yield run
    run.free_all()


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def _weights(run, w) -> dict:
    return {f"w_{k}": run.upload(v) for k, v in w.planes().items()}


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
    dy = gpu.upload(y)
    gpu.launch(f"matvec_{qtype.lower()}_{version}",
               _weights(gpu, w) | {"x": gpu.upload(x), "y": dy, "N": n, "K": k, "B": batch})
    gpu.sync()
    err = np.abs(gpu.download(dy, y) - R.matvec(w, x))
    assert np.all(err <= _bound(x, w, 1e-4) + 1e-30), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_gemm(gpu, qtype, rng):
    m, n, k = 130, 200, _cols(qtype)
    w = R.random_repacked(qtype, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = np.full((m, n), np.nan, np.float32)
    dy = gpu.upload(y)
    gpu.launch(f"gemm_{qtype.lower()}",
               _weights(gpu, w) | {"x": gpu.upload(x), "y": dy, "M": m, "N": n, "K": k})
    gpu.sync()
    err = np.abs(gpu.download(dy, y) - R.matvec(w, x))
    assert np.all(err <= _bound(x, w, 4e-3)), f"max err {np.nanmax(err)}"


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_embedding(gpu, qtype, rng):
    v, k = 40, _cols(qtype)
    w = R.random_repacked(qtype, v, k, rng)
    ids = np.array([0, v - 1, 5, 5, 17], np.int32)
    o = np.full((len(ids), k), np.nan, np.float32)
    do = gpu.upload(o)
    gpu.launch(f"embedding_{qtype.lower()}",
               _weights(gpu, w) | {"ids": gpu.upload(ids), "out": do, "K": k, "T": len(ids)})
    gpu.sync()
    np.testing.assert_allclose(gpu.download(do, o), R.embedding(w, ids), rtol=1e-6, atol=1e-30)


def test_rmsnorm_swiglu_add_bias(gpu, rng):
    m, d = 5, 1536
    x = rng.standard_normal((m, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    y = np.full_like(x, np.nan)
    dy = gpu.upload(y)
    gpu.launch("rmsnorm_f32", {"x": gpu.upload(x), "weight": gpu.upload(w), "y": dy,
                               "D": d, "eps": 1e-6, "M": m})
    g, u = x.reshape(-1), np.roll(x.reshape(-1), 7)
    ds, da = gpu.upload(np.full_like(g, np.nan)), gpu.upload(np.full_like(g, np.nan))
    dg, du = gpu.upload(g), gpu.upload(u)
    gpu.launch("swiglu_f32", {"gate": dg, "up": du, "out": ds, "n": g.size})
    gpu.launch("add_f32", {"a": dg, "b": du, "out": da, "n": g.size})
    dx, dbias = gpu.upload(x), gpu.upload(w)
    gpu.launch("add_bias_f32", {"x": dx, "bias": dbias, "out": dx, "n": x.size, "N": d})
    gpu.sync()
    np.testing.assert_allclose(gpu.download(dx, x), R.add_bias(x, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gpu.download(dy, y), R.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gpu.download(ds, g), R.swiglu(g, u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.download(da, g), R.add(g, u), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("hd", [64, 128])
def test_rope(gpu, mode, hd, rng):
    t, h, stride = 6, 4, 9 * hd
    x = rng.standard_normal((t, stride)).astype(np.float32)
    pos = np.array([0, 1, 2, 100, 2047, 4095], np.int32)
    y = np.full((t, h * hd), np.nan, np.float32)
    dy = gpu.upload(y)
    gpu.launch(f"rope_{mode}_d{hd}", {"x": gpu.upload(x), "y": dy, "pos": gpu.upload(pos),
                                      "stride_x": stride, "stride_y": h * hd,
                                      "log2_base": math.log2(1e4), "T": t, "H": h})
    gpu.sync()
    want = R.rope(x[:, : h * hd].reshape(t, h, hd), pos, 1e4, mode == "neox").reshape(t, -1)
    np.testing.assert_allclose(gpu.download(dy, y), want, atol=2e-3 * np.abs(x).max(), rtol=0)


@pytest.mark.parametrize("hd", [64, 128])
def test_attention_prefill_and_decode(gpu, hd, rng):
    hq, hkv, n_slots, n_ctx = 12, 2, 3, 300
    k = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    v = rng.standard_normal((n_slots, n_ctx, hkv, hd)).astype(np.float16)
    dk, dv = gpu.upload(k), gpu.upload(v)
    scale = hd ** -0.5
    start, t = 40, 150  # a second prefill chunk of slot 1
    q = rng.standard_normal((t, hq, hd)).astype(np.float32)
    o = np.full_like(q, np.nan)
    do = gpu.upload(o)
    slot_bytes = n_ctx * hkv * hd * 2
    gpu.launch(f"attn_prefill_d{hd}", {"q": gpu.upload(q), "k_cache": dk + slot_bytes,
                                       "v_cache": dv + slot_bytes, "out": do, "T": t,
                                       "start": start, "Hq": hq, "Hkv": hkv, "scale": scale})
    slots, lens = np.array([2, 0, 1], np.int32), np.array([1, 300, 129], np.int32)
    qd = rng.standard_normal((3, hq, hd)).astype(np.float32)
    od = np.full_like(qd, np.nan)
    dod = gpu.upload(od)
    splits, chunk = 5, 64  # 5 * 64 >= n_ctx; row 0 leaves four splits empty
    dpo, dpml = gpu.empty(3 * hq * splits * hd * 4), gpu.empty(3 * hq * splits * 2 * 4)
    sizes = {"n_ctx": n_ctx, "chunk": chunk, "Hq": hq, "Hkv": hkv, "scale": scale, "B": 3, "S": splits}
    gpu.launch(f"attn_decode_d{hd}", sizes | {"q": gpu.upload(qd), "k_cache": dk, "v_cache": dv,
                                              "part_out": dpo, "part_ml": dpml,
                                              "slots": gpu.upload(slots), "lens": gpu.upload(lens)})
    gpu.launch(f"attn_combine_d{hd}", sizes | {"part_out": dpo, "part_ml": dpml, "out": dod})
    gpu.sync()
    want = R.attention(q, k[1, : start + t], v[1, : start + t], start + np.arange(t), scale)
    np.testing.assert_allclose(gpu.download(do, o), want, atol=1e-2 * np.abs(v).max(), rtol=0)
    got = gpu.download(dod, od)
    for i, (s, n) in enumerate(zip(slots, lens)):
        want = R.attention(qd[i : i + 1], k[s, :n], v[s, :n], np.array([n - 1]), scale)[0]
        np.testing.assert_allclose(got[i], want, atol=1e-3 * np.abs(v).max(), rtol=0)


def test_argmax_and_store_rows(gpu, rng):
    b, vocab = 3, 151936
    logits = rng.standard_normal((b, vocab)).astype(np.float32)
    logits[1, [7, 150000]] = 99.0
    out = np.full(b, -1, np.int32)
    dout = gpu.upload(out)
    gpu.launch("argmax_f32", {"logits": gpu.upload(logits), "out": dout, "V": vocab, "B": b})
    rows, width = np.array([5, 0, 9], np.int32), 2 * 128
    dst = np.full((10, width), 7.0, np.float16)
    src = rng.standard_normal((3, width)).astype(np.float32)
    ddst = gpu.upload(dst)
    gpu.launch("store_rows_f16", {"src": gpu.upload(src), "dst": ddst, "rows": gpu.upload(rows),
                                  "W": width, "src_stride": width, "T": 3})
    gpu.sync()
    np.testing.assert_array_equal(gpu.download(dout, out), R.argmax(logits))
    np.testing.assert_array_equal(gpu.download(ddst, dst), R.store_rows(dst, src, rows))


def test_artifact_kind_matches_the_device(gpu):
    gpu.function("add_f32")
    kind = gpu.loaded_kinds["add_f32"]
    if gpu.ptx_target:
        assert kind == "sm_80/ptx"
    elif gpu.cc == (9, 0):
        assert kind == "sm_90a/cubin"
    else:
        assert kind.endswith("/ptx")
