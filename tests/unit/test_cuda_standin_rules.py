"""The stand-in driver's GPU rules (tests/fakes/cuda_streams.py): queued stream work, faults at
the next sync that stick like a lost context, capture invalidation, pageable copy sources, graph
bookkeeping, and the f16 roundings of the prefill GEMM and attention emulations.

The driver is called directly (as cuda-python is), below the product, with the manifest's own
entry for `add_f32`, so each rule is checked on its own."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ukgpu.ptx_kernels import reference as ref
from ukgpu.ptx_kernels.loader import BUILD_DIR, param_ctype

from fakes import cuda_kernels as kernels
from fakes.cuda_driver import CUresult, FakeDriver, _Function

E = CUresult
ROOT = Path(__file__).resolve().parents[2]
N = 256  # floats per buffer


def _entry(name: str) -> dict:
    for man in sorted(BUILD_DIR.glob("*/manifest.json")):
        entries = json.loads(man.read_text())["entries"]
        if name in entries:
            return entries[name]
    raise LookupError(name)


ADD = _Function(_entry("add_f32"))


def device(**knobs) -> tuple[FakeDriver, object]:
    fake = FakeDriver(**knobs)
    fake.cuInit(0)
    fake.cuCtxSetCurrent(fake.cuDevicePrimaryCtxRetain(0)[1])
    return fake, fake.cuStreamCreate(1)[1]  # CU_STREAM_NON_BLOCKING, as the product's stream


def add(fake: FakeDriver, stream, a: int, b: int, out: int, n: int = N) -> CUresult:
    values = {"a": a, "b": b, "out": out, "n": n}
    params = ADD.entry["params"]
    args = tuple(values.get(p["name"], 0) for p in params)
    types = tuple(param_ctype(p["type"]) for p in params)
    grid = -(-n // ADD.entry["constexprs"]["BLOCK"])
    return fake.cuLaunchKernel(ADD, grid, 1, 1, ADD.entry["threads_per_block"], 1, 1,
                               ADD.entry["shared_bytes"], stream, (args, types), None)[0]


def upload(fake: FakeDriver, stream, arr: np.ndarray) -> int:
    ptr = fake.cuMemAlloc(arr.nbytes)[1]
    assert fake.cuMemcpyHtoDAsync(ptr, arr.ctypes.data, arr.nbytes, stream)[0] == E.CUDA_SUCCESS
    return ptr


def read(fake: FakeDriver, stream, ptr: int, n: int = N) -> np.ndarray:
    out = np.empty(n, np.float32)
    assert fake.cuMemcpyDtoHAsync(out.ctypes.data, ptr, out.nbytes, stream)[0] == E.CUDA_SUCCESS
    return out


def three(fake: FakeDriver, stream) -> tuple[int, int, int]:
    a = upload(fake, stream, np.arange(N, dtype=np.float32))
    b = upload(fake, stream, np.full(N, 0.5, np.float32))
    return a, b, fake.cuMemAlloc(4 * N)[1]


def assert_lost(fake: FakeDriver, stream, err: CUresult) -> None:
    """Every call that touches the context now returns `err`."""
    buf = np.zeros(4, np.float32)
    assert fake.cuMemAlloc(64)[0] == err
    assert fake.cuMemcpyHtoDAsync(0, buf.ctypes.data, 16, stream)[0] == err
    assert fake.cuMemcpyDtoHAsync(buf.ctypes.data, 0, 16, stream)[0] == err
    assert fake.cuStreamSynchronize(stream)[0] == err
    assert fake.cuModuleLoadData(b"\0")[0] == err
    assert add(fake, stream, 0, 0, 0) == err


def test_work_is_queued_until_a_sync_and_a_blocking_copy_waits_only_for_blocking_streams():
    fake, stream = device()
    a, b, out = three(fake, stream)
    assert add(fake, stream, a, b, out) == E.CUDA_SUCCESS
    assert fake.trace == []  # launched, not run
    host = np.full(N, -1, np.float32)
    assert fake.cuMemcpyDtoH(host.ctypes.data, out, 4 * N)[0] == E.CUDA_SUCCESS
    assert not host.any()  # the legacy NULL stream does not wait for a non-blocking stream
    np.testing.assert_array_equal(read(fake, stream, out), np.arange(N) + 0.5)  # DtoHAsync waits
    assert [t[0]["name"] for t in fake.trace] == ["add_f32"] and fake.trace[0][2] == (1, 1, 1)


def test_a_planted_use_of_a_freed_buffer_fails_at_the_next_sync_and_the_context_stays_lost():
    fake, stream = device()
    a, b, out = three(fake, stream)
    kept_alloc = fake.cuMemAlloc  # looked up before the loss, as gpu.cuda.Driver keeps it
    assert fake.cuMemFree(b)[0] == E.CUDA_SUCCESS
    assert add(fake, stream, a, b, out) == E.CUDA_SUCCESS  # the launch itself is fine
    assert fake.cuStreamSynchronize(stream)[0] == E.CUDA_ERROR_ILLEGAL_ADDRESS
    assert kept_alloc(64)[0] == E.CUDA_ERROR_ILLEGAL_ADDRESS
    assert "add_f32" in fake.last_fault and "freed" in fake.last_fault
    assert fake.cuGetErrorName(E.CUDA_ERROR_ILLEGAL_ADDRESS)[1] == b"CUDA_ERROR_ILLEGAL_ADDRESS"
    assert_lost(fake, stream, E.CUDA_ERROR_ILLEGAL_ADDRESS)
    assert fake.cuMemFree(a)[0] == E.CUDA_ERROR_ILLEGAL_ADDRESS and a not in fake.allocs
    fake.reset()  # a fresh context answers again
    assert fake.cuMemAlloc(64)[0] == E.CUDA_SUCCESS


def test_an_out_of_range_write_is_an_illegal_address_at_the_next_sync():
    fake, stream = device()
    a, b, out = three(fake, stream)
    assert add(fake, stream, a, b, out, n=N + 64) == E.CUDA_SUCCESS
    later = np.ones(N, np.float32)
    assert fake.cuMemcpyHtoDAsync(a, later.ctypes.data, later.nbytes, stream)[0] == E.CUDA_SUCCESS
    assert fake.cuMemcpyDtoHAsync(later.ctypes.data, a, 16, stream)[0] == E.CUDA_ERROR_ILLEGAL_ADDRESS
    assert "outside every allocation" in fake.last_fault
    assert_lost(fake, stream, E.CUDA_ERROR_ILLEGAL_ADDRESS)


def test_an_unaligned_pointer_is_a_misaligned_address_at_the_next_sync():
    fake, stream = device()
    a, b, out = three(fake, stream)
    assert add(fake, stream, a + 4, b, out, n=N - 1) == E.CUDA_SUCCESS  # in range, off 16 bytes
    assert fake.cuCtxSynchronize()[0] == E.CUDA_ERROR_MISALIGNED_ADDRESS
    assert "add_f32" in fake.last_fault and "aligned" in fake.last_fault
    assert_lost(fake, stream, E.CUDA_ERROR_MISALIGNED_ADDRESS)


def test_launch_argument_errors_stay_at_the_launch():
    fake, stream = device()
    a, b, out = three(fake, stream)
    assert fake.cuLaunchKernel(ADD, 0, 1, 1, 128, 1, 1, 0, stream, ((), ()), None)[0] == \
        E.CUDA_ERROR_INVALID_VALUE
    assert fake.cuStreamSynchronize(stream)[0] == E.CUDA_SUCCESS and fake.sticky is None


def test_a_pageable_copy_inside_a_capture_invalidates_it_and_no_graph_comes_back():
    fake, stream = device()
    a, b, out = three(fake, stream)
    assert fake.cuStreamBeginCapture(stream, 1)[0] == E.CUDA_SUCCESS
    assert add(fake, stream, a, b, out) == E.CUDA_SUCCESS
    host = np.ones(N, np.float32)
    assert fake.cuMemcpyHtoDAsync(a, host.ctypes.data, host.nbytes, stream)[0] == \
        E.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    assert add(fake, stream, a, b, out) == E.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    assert fake.cuStreamEndCapture(stream) == (E.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, None)
    assert not fake.live_graphs and fake.sticky is None  # the context itself is fine
    np.testing.assert_array_equal(read(fake, stream, a), np.arange(N))  # nothing was copied


@pytest.mark.parametrize("call", ["sync", "alloc", "blocking copy"])
def test_a_call_a_thread_local_capture_refuses_invalidates_it(call):
    fake, stream = device()
    a, b, out = three(fake, stream)
    other = fake.cuStreamCreate(1)[1]
    fake.cuStreamBeginCapture(stream, 1)
    host = np.zeros(N, np.float32)
    err = {"sync": lambda: fake.cuStreamSynchronize(stream)[0],
           "alloc": lambda: fake.cuMemAlloc(64)[0],
           "blocking copy": lambda: fake.cuMemcpyDtoH(host.ctypes.data, out, 16)[0]}[call]()
    assert err == E.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    assert fake.cuStreamSynchronize(other)[0] == E.CUDA_SUCCESS  # another stream, THREAD_LOCAL
    assert fake.cuStreamEndCapture(stream)[0] == E.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED


def test_a_global_capture_refuses_a_sync_of_another_stream_and_a_relaxed_one_an_alloc_not():
    fake, stream = device()
    other = fake.cuStreamCreate(1)[1]
    fake.cuStreamBeginCapture(stream, 0)
    assert fake.cuStreamSynchronize(other)[0] == E.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    assert fake.cuStreamEndCapture(stream)[0] == E.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    fake.cuStreamBeginCapture(stream, 2)
    assert fake.cuMemAlloc(64)[0] == E.CUDA_SUCCESS
    err, graph = fake.cuStreamEndCapture(stream)
    assert err == E.CUDA_SUCCESS and fake.live_graphs == {graph}


def test_a_graph_runs_when_its_stream_is_synchronized_and_leaves_nothing_once_destroyed():
    fake, stream = device()
    a, b, out = three(fake, stream)
    fake.cuStreamSynchronize(stream)
    fake.cuStreamBeginCapture(stream, 1)
    assert add(fake, stream, a, b, out) == E.CUDA_SUCCESS
    assert fake.cuMemsetD32Async(a, 0, N, stream)[0] == E.CUDA_SUCCESS  # a captured memset
    err, graph = fake.cuStreamEndCapture(stream)
    assert err == E.CUDA_SUCCESS and fake.trace == []  # captured, never run
    exec_ = fake.cuGraphInstantiate(graph, 0)[1]
    assert fake.cuGraphDestroy(graph)[0] == E.CUDA_SUCCESS
    assert fake.cuGraphLaunch(exec_, stream)[0] == E.CUDA_SUCCESS
    assert fake.graph_kernel_runs == 0  # queued
    np.testing.assert_array_equal(read(fake, stream, out), np.arange(N) + 0.5)
    np.testing.assert_array_equal(read(fake, stream, a), np.zeros(N))
    assert fake.graph_launches == 1 and fake.graph_kernel_runs == 1
    assert fake.cuGraphExecDestroy(exec_)[0] == E.CUDA_SUCCESS
    assert not fake.live_graphs and not fake.live_execs
    assert fake.cuGraphExecDestroy(exec_)[0] == E.CUDA_ERROR_INVALID_VALUE  # no double destroy


@pytest.mark.parametrize("pinned", [False, True])
def test_an_async_copy_source_changed_before_the_copy_ran_is_recorded(pinned):
    fake, stream = device(pinned_sources=pinned)
    dst = fake.cuMemAlloc(4 * N)[1]
    src = np.arange(N, dtype=np.float32)
    fake.cuMemcpyHtoDAsync(dst, src.ctypes.data, src.nbytes, stream)
    src[:] = 7  # the product reuses the buffer before the stream reached the copy
    got = read(fake, stream, dst)
    assert [(c.dst, c.nbytes, c.readable) for c in fake.async_source_changes] == [(dst, 4 * N, True)]
    np.testing.assert_array_equal(got, src if pinned else np.arange(N))  # DMA reads it late


@pytest.mark.parametrize("pinned", [False, True])
def test_a_freed_async_copy_source_is_read_safely_and_faults_only_under_dma(pinned):
    fake, stream = device(pinned_sources=pinned)
    n = 1 << 20  # 4 MiB in a mapping of its own, unmapped before the copy runs
    dst = fake.cuMemAlloc(4 * n)[1]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    src = libc.mmap(None, 4 * n, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    ctypes.memset(src, 1, 4 * n)
    fake.cuMemcpyHtoDAsync(dst, src, 4 * n, stream)
    assert libc.munmap(src, 4 * n) == 0
    err = fake.cuStreamSynchronize(stream)[0]
    assert [c.readable for c in fake.async_source_changes] == [False]
    assert err == (E.CUDA_ERROR_ILLEGAL_ADDRESS if pinned else E.CUDA_SUCCESS)


def _gemm_and_matvec(x: np.ndarray, w: np.ndarray, gemm: dict) -> tuple[np.ndarray, np.ndarray]:
    fake, stream = device()
    m, k = x.shape
    n = w.shape[0]
    pw, px = upload(fake, stream, w.astype(np.float16)), upload(fake, stream, x)
    py = fake.cuMemAlloc(4 * m * n)[1]
    fake.cuCtxSynchronize()
    args = {"w_q": pw, "w_s": 0, "w_m": 0, "x": px, "y": py, "M": m, "N": n, "K": k, "B": m}
    out = []
    for entry in (gemm, _entry("matvec_f16_b1")):
        with np.errstate(all="ignore"):
            kernels.matmul(fake, entry, args, ())
        out.append(fake.view(py, np.float32, m * n).reshape(m, n).copy())
    return out[0], out[1]


def test_the_gemm_rounds_its_operands_to_f16_and_the_matvec_does_not():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    w = rng.standard_normal((8, 64)).astype(np.float32) * 0.05
    gemm, matvec = _gemm_and_matvec(x, w, _entry("gemm_f16"))
    exact = x.astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
    assert np.abs(matvec - exact).max() < 1e-5 < np.abs(gemm - exact).max() < 1e-2
    plain = _entry("gemm_f16")  # a build that casts x straight to f16 (today's PTX before scaling)
    plain["constexprs"] = {k: v for k, v in plain["constexprs"].items() if k != "X_EXP_SHIFT"}
    x[1, 3] = 70000.0  # a "massive activation" channel, past float16's 65504
    gemm, matvec = _gemm_and_matvec(x, w, plain)
    assert np.isfinite(matvec).all() and not np.isfinite(gemm[1]).any()
    assert np.isfinite(gemm[[0, 2, 3]]).all()


def test_prefill_attention_rounds_q_and_p_to_f16_block_by_block():
    rng = np.random.default_rng(1)
    t, hq, hkv, d = 70, 4, 2, 64  # two query blocks, two key blocks
    entry = {"name": "attn_prefill_d64",
             "constexprs": {"HEAD_DIM": d, "D_PAD": d, "BLOCK_M": 64, "BLOCK_N": 64}}
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    kv = rng.standard_normal((2, t, hkv, d)).astype(np.float16)
    fake, stream = device()
    pq, pk, pv = (upload(fake, stream, arr) for arr in (q, kv[0], kv[1]))
    po = fake.cuMemAlloc(q.nbytes)[1]
    fake.cuCtxSynchronize()
    args = {"q": pq, "k_cache": pk, "v_cache": pv, "out": po, "T": t, "start": 0, "Hq": hq,
            "Hkv": hkv, "scale": d ** -0.5, "window": 0}
    kernels.attn_prefill(fake, entry, args, (2, hq, 1))
    got = fake.view(po, np.float32, q.size).reshape(q.shape)
    want = ref.attention(q.astype(np.float64), kv[0], kv[1], np.arange(t), d ** -0.5, 0)
    err = np.abs(got - want).max()
    assert 1e-6 < err < 5e-3  # f16 rounding of q*scale and p shows, and stays at f16 level


def test_the_rules_hold_through_the_real_bindings_over_the_libcuda_stub(tmp_path):
    """A freed buffer's fault through cuda-python and libcuda.so.1: the launch succeeds, the
    sync returns CUDA_ERROR_ILLEGAL_ADDRESS, and so does the next allocation."""
    sys.path.insert(0, str(ROOT / "tests" / "cuda_stub"))
    from libcuda_stub import build

    build(tmp_path)
    ptx = next(BUILD_DIR.glob("*/manifest.json")).parent / ADD.entry["artifacts"]["ptx"]["file"]
    code = f"""
import sys
sys.path.insert(0, 'tests/cuda_stub')
from libcuda_stub import install
stub = install()
from cuda.bindings import driver as d
from ukgpu.ptx_kernels.loader import param_ctype
params = {ADD.entry["params"]!r}
d.cuInit(0)
d.cuCtxSetCurrent(d.cuDevicePrimaryCtxRetain(d.cuDeviceGet(0)[1])[1])
stream = d.cuStreamCreate(1)[1]
fn = d.cuModuleGetFunction(d.cuModuleLoadData(open({str(ptx)!r}, 'rb').read() + b'\\0')[1],
                           b'add_kernel')[1]
a, b = d.cuMemAlloc(4096)[1], d.cuMemAlloc(4096)[1]
d.cuMemFree(b)
values = {{'a': int(a), 'b': int(b), 'out': int(a), 'n': 1000}}
args = (tuple(values.get(p['name'], 0) for p in params),
        tuple(param_ctype(p['type']) for p in params))
print(int(d.cuLaunchKernel(fn, 1, 1, 1, 128, 1, 1, 0, stream, args, 0)[0]), stub.fake.trace == [])
print(int(d.cuStreamSynchronize(stream)[0]), int(d.cuMemAlloc(64)[0]))
print(d.cuGetErrorName(d.cuStreamSynchronize(stream)[0])[1].decode(), stub.fake.last_fault)
"""
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path), UKGPU_CUDA_STUB=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["0 True", "700 700"], out.stdout + out.stderr  # launch fine, then lost
    name, fault = lines[2].split(" ", 1)
    assert name == "CUDA_ERROR_ILLEGAL_ADDRESS" and "add_f32" in fault and "freed" in fault


def test_the_stub_environment_sets_dma_sources_and_trace_only_launches():
    sys.path.insert(0, str(ROOT / "tests" / "cuda_stub"))
    from libcuda_stub import fake_from_env

    fake = fake_from_env({"UKGPU_CUDA_STUB_PINNED": "1", "UKGPU_CUDA_STUB_EMULATE": "0"})
    assert fake.pinned_sources and not fake.emulate
    plain = fake_from_env({})
    assert not plain.pinned_sources and plain.emulate


def test_without_emulation_launches_are_checked_and_traced_but_not_computed():
    fake, stream = device(emulate=False)
    a, b, out = three(fake, stream)
    assert add(fake, stream, a, b, out) == E.CUDA_SUCCESS
    assert add(fake, stream, a + 4, b, out, n=N - 1) == E.CUDA_SUCCESS
    assert fake.cuStreamSynchronize(stream)[0] == E.CUDA_ERROR_MISALIGNED_ADDRESS  # still checked
    assert len(fake.trace) == 2 and not fake.view(out, np.float32, N).any()
