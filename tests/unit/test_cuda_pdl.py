"""Programmatic dependent launch (ptx_kernels/pdl.py, gpu/cuda/modules.py) on the fake driver:
which launches carry the attribute (sm_90a kernels on an sm_90 device, never the portable PTX,
never with UKGPU_PDL=0), the launch config made once per plan, a driver that refuses the
attribute (eager and inside a graph capture: PDL goes off, nothing is lost), and the decode graph
recorded from PDL launches giving the same tokens as plain launches."""

from __future__ import annotations

import numpy as np
import pytest

from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.driver import open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.gpu.cuda.select import create_backend
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model
from ukgpu.ptx_kernels.loader import Manifests

from fakes.cuda_driver import CUresult, FakeDevice, FakeDriver
from fakes.tiny_models import SHAPES, write_model

MANIFESTS = Manifests.load()


def _add(ks: KernelSet, n: int = 3000) -> np.ndarray:
    """a + b through add_f32, read back."""
    arena = DeviceArena(ks.cu, 1 << 20)
    a, b = np.arange(n, dtype=np.float32), np.full(n, 0.25, dtype=np.float32)
    pa, pb, out = (arena.alloc(4 * n) for _ in range(3))
    ks.cu.cuMemcpyHtoD(pa, a.ctypes.data, 4 * n)
    ks.cu.cuMemcpyHtoD(pb, b.ctypes.data, 4 * n)
    ks.launch("add_f32", {"a": pa, "b": pb, "out": out, "n": n})
    ks.ctx.sync()
    got = np.empty(n, np.float32)
    ks.cu.cuMemcpyDtoH(got.ctypes.data, out, 4 * n)
    np.testing.assert_array_equal(got, a + b)
    return got


def _set(fake: FakeDriver, **kw) -> KernelSet:
    return KernelSet(open_device(0, fake), MANIFESTS, **kw)


def test_an_sm90_device_launches_the_gated_cubin_with_pdl():
    fake = FakeDriver()
    ks = _set(fake)
    _add(ks)
    assert ks.pdl and fake.pdl_launches == 1 and fake.launches == ["add_f32"]
    assert ks.describe() == [{"entry": "add_f32", "target": "sm_90a", "kind": "cubin", "pdl": True}]


@pytest.mark.parametrize("why, fake, kw, env", [
    ("sm_89 has no programmatic", FakeDriver(devices=[FakeDevice(cc=(8, 9))]), {}, "1"),
    ("UKGPU_PDL=0", FakeDriver(), {}, "0"),
    ("", FakeDriver(), {"force_ptx": "sm_80"}, "1"),  # the portable PTX has no gate
])
def test_plain_launches_where_pdl_cannot_or_must_not_be_used(why, fake, kw, env, monkeypatch):
    monkeypatch.setenv("UKGPU_PDL", env)
    ks = _set(fake, **kw)
    _add(ks)
    assert fake.pdl_launches == 0 and fake.launches == ["add_f32"]
    assert ks.pdl_off.startswith(why)
    assert [k["pdl"] for k in ks.describe()] == [False]


def test_one_launch_config_per_plan():
    fake = FakeDriver()
    ks = _set(fake)
    arena = DeviceArena(ks.cu, 1 << 20)
    a, b, out = (arena.alloc(4096) for _ in range(3))
    for n in (1000, 1000, 8):
        ks.launch("add_f32", {"a": a, "b": b, "out": out, "n": n})
    ks.ctx.sync()
    k = ks.kernel("add_f32")
    assert fake.pdl_launches == 3 and len(k.configs) == 2
    cfg = k.configs[(1000,)][1]  # keyed like the plans: the scalar arguments
    assert (cfg.gridDimX, cfg.blockDimX, cfg.numAttrs) == (1, k.entry.block[0], 1)


def test_a_driver_that_refuses_the_attribute_turns_pdl_off_once(capsys):
    fake = FakeDriver(fail={"cuLaunchKernelEx": "CUDA_ERROR_NOT_SUPPORTED"})
    ks = _set(fake)
    _add(ks)  # the refused launch was made again without the attribute
    _add(ks)
    assert fake.pdl_launches == 0 and fake.launches == ["add_f32"] * 2
    assert "CUDA_ERROR_NOT_SUPPORTED" in ks.pdl_off
    assert capsys.readouterr().err.count("programmatic dependent launch off") == 1


def test_the_stand_in_refuses_pdl_for_a_kernel_without_the_gate():
    fake = FakeDriver()
    ks = _set(fake, force_ptx="sm_80")
    k = ks.kernel("add_f32")
    cfg = ks._config(((1, 1, 1), k.entry.block, k.entry.shared_bytes), ks.ctx.stream)
    assert fake.cuLaunchKernelEx(cfg, k.function, 0, 0)[0] == CUresult.CUDA_ERROR_INVALID_VALUE
    assert fake.unsafe_pdl == ["add_f32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    name = sorted(SHAPES)[0]
    return open_gguf(write_model(tmp_path_factory.mktemp("pdl") / f"{name}.gguf", SHAPES[name]))


def _decode(gguf, fake: FakeDriver, steps: int = 4) -> tuple[list[int], object]:
    be = create_backend(gguf=gguf, driver=fake, arena_bytes=64 << 20, n_ctx=64)
    model = Model(gguf, be)
    kv = model.new_kv(64)
    model.forward(np.array([3, 17, 99, 250]), 0, kv, all_logits=False)
    tok, out = 42, []
    for pos in range(4, 4 + steps):
        tok = be.decode_greedy(model, tok, pos, kv)
        out.append(tok)
    return out, be


def test_the_decode_graph_records_pdl_launches_and_gives_the_same_tokens(tiny, monkeypatch):
    fake = FakeDriver()
    got, be = _decode(tiny, fake)
    assert be.graphs.captures == 1 and not be.graphs.eager_reason and be.kernels.pdl
    assert fake.graph_launches == 3 and fake.pdl_launches > 0 and not fake.unsafe_pdl
    monkeypatch.setenv("UKGPU_PDL", "0")
    plain = FakeDriver()
    want, _ = _decode(tiny, plain)
    assert plain.pdl_launches == 0 and plain.graph_launches == 3
    assert got == want


def test_a_capture_refused_for_pdl_is_recorded_again_without_it(tiny, capsys, monkeypatch):
    fake = FakeDriver()
    real = fake.launch_ex

    def refuse_in_capture(fn, grid, block, shared, stream, params, extra, pdl):
        if pdl and stream.capture is not None:  # a driver that cannot record PDL edges
            stream.capture_invalid = True
            return (CUresult.CUDA_ERROR_NOT_SUPPORTED,)
        return real(fn, grid, block, shared, stream, params, extra, pdl)

    monkeypatch.setattr(fake, "launch_ex", refuse_in_capture)
    got, be = _decode(tiny, fake)
    assert be.graphs.captures == 1 and not be.graphs.eager_reason and fake.graph_launches == 3
    assert "decode graph capture refused" in be.kernels.pdl_off
    assert capsys.readouterr().err.count("programmatic dependent launch off") == 1
    monkeypatch.setenv("UKGPU_PDL", "0")
    want, _ = _decode(tiny, FakeDriver())
    assert got == want


def test_verify_compares_the_pdl_graph_with_a_plain_one_bit_for_bit(tiny, monkeypatch):
    from ukgpu.gpu.cuda.verify import pdl_checks

    be = create_backend(gguf=tiny, driver=FakeDriver(), arena_bytes=64 << 20, n_ctx=64)
    ids = np.array([3, 17, 99, 250, 4])
    (check,) = pdl_checks(tiny, be, ids, 4)
    assert check.ok and check.value == 0 and be.kernels.pdl  # on again after the plain run
    real = be.decode

    def racy(model, token, pos, kv):  # what a kernel reading too early would do to one step
        row = real(model, token, pos, kv)
        return row + np.float32(1e-3) if be.kernels.pdl and pos == len(ids) + 2 else row

    monkeypatch.setattr(be, "decode", racy)
    (check,) = pdl_checks(tiny, be, ids, 4)
    assert not check.ok and check.detail == "1 of 4 steps differ, first at step 2"
    be.kernels.disable_pdl("test")
    assert pdl_checks(tiny, be, ids, 4) == []  # nothing to compare where PDL is off


def test_the_real_bindings_carry_the_attribute_to_the_driver(tmp_path):
    """cuda-python marshals the launch config; the stub libcuda's C reads the attribute out of
    it (tests/cuda_stub): with it on, the stand-in counts a PDL launch; off, a plain one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "tests" / "cuda_stub"))
    from libcuda_stub import build

    build(tmp_path)
    code = """
import sys
sys.path.insert(0, 'tests/cuda_stub')
from libcuda_stub import install
stub = install()
from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.driver import open_device
from ukgpu.gpu.cuda.modules import KernelSet
ks = KernelSet(open_device(0))
arena = DeviceArena(ks.cu, 1 << 20)
a, b, out = (arena.alloc(4096) for _ in range(3))
ks.launch('add_f32', {'a': a, 'b': b, 'out': out, 'n': 1000})
ks.ctx.sync()
print(ks.pdl, stub.fake.pdl_launches, stub.fake.launches, stub.fake.unsafe_pdl)
"""
    for pdl, want in (("1", "True 1 ['add_f32'] []"), ("0", "False 0 ['add_f32'] []")):
        env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path), UKGPU_CUDA_STUB=str(tmp_path), UKGPU_PDL=pdl)
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == want, out.stdout + out.stderr
