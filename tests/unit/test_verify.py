"""`ukgpu verify` on the fake driver: exit codes (0 pass, 1 mismatch, 2 no GPU), the JSON report,
poisoned outputs catching a kernel that writes nothing, and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ukgpu.gpu.cuda.verify import EXIT_MISMATCH, EXIT_NO_GPU, EXIT_OK, VerifyOptions, run
from ukgpu.tools.cli import main

from fakes import cuda_kernels as cuda_fake_kernels
from fakes.cuda_driver import FakeDevice, FakeDriver
from fakes.tiny_models import SHAPES, write_model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("verify") / "tiny-qwen2.gguf", SHAPES["tiny-qwen2"])


def verify(tmp_path, driver, **opts):
    lines = []
    out = tmp_path / "verify.json"
    code = run(VerifyOptions(json_out=out, **opts), driver=driver, out=lines.append)
    return code, json.loads(out.read_text()), "\n".join(lines)


def test_every_level_passes_on_a_correct_driver(tmp_path, tiny_path):
    code, report, text = verify(tmp_path, FakeDriver(), model=str(tiny_path), n_generate=6)
    assert code == EXIT_OK and report["status"] == "pass"
    levels = {c["level"] for c in report["checks"]}
    assert levels == {"kernel", "layer", "e2e"}
    names = {c["name"] for c in report["checks"]}
    assert {"gemm_q4_k", "matvec_q6_k_b1", "embedding_q8_0", "rope_neox_d128", "argmax_f32", "add_bias_f32",
            "attn_prefill_d64", "block 1 ffn residual", "greedy continuation (graph decode)",
            "matvec_split_add_q6_k_b1", "matvec_split_add_q6_k_b1 repeated"} <= names
    assert all(c["ok"] for c in report["checks"])
    assert "gemm_q4_k [sm_80 ptx]" in names  # the H100 cubins, then the portable PTX
    assert sum(c["level"] == "layer" for c in report["checks"]) == 2 * SHAPES["tiny-qwen2"].n_layers
    assert "fake" in report["device"] and report["kernels_loaded"]
    assert "verify: pass" in text and "FAIL" not in text


def test_a_wrong_kernel_is_a_mismatch(tmp_path, tiny_path, monkeypatch):
    def off_by_one(mem, e, a, grid):
        n = a["n"]
        out = mem.view(a["a"], np.float32, n) + mem.view(a["b"], np.float32, n) + 1.0
        mem.view(a["out"], np.float32, n)[:] = out

    def residual_off_by_one(mem, e, a, grid):  # the fused residual GEMM a prefill block runs
        gemm_add(mem, e, a, grid)
        y = mem.view(a["y"], np.float32, a["M"] * a["N"])
        y[:] = y + 1.0

    gemm_add = cuda_fake_kernels.EMULATORS["gemm_add"]
    monkeypatch.setitem(cuda_fake_kernels.EMULATORS, "add", off_by_one)
    monkeypatch.setitem(cuda_fake_kernels.EMULATORS, "gemm_add", residual_off_by_one)
    code, report, text = verify(tmp_path, FakeDriver(), model=str(tiny_path), e2e=False)
    assert code == EXIT_MISMATCH and report["status"] == "fail"
    bad = {c["name"] for c in report["checks"] if not c["ok"]}
    assert "add_f32" in bad and "block 0 attn residual" in bad
    assert "gemm_add_q4_k" in bad and "gemm_q4_k" not in bad and "gemm_qkv_q4_k" not in bad
    assert "FAIL" in text and "verify: fail" in text


def test_an_unwritten_output_stays_poisoned_and_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(cuda_fake_kernels.EMULATORS, "swiglu", lambda mem, e, a, grid: None)
    code, report, _ = verify(tmp_path, FakeDriver(), layers=False, e2e=False)
    check = next(c for c in report["checks"] if c["name"] == "swiglu_f32")
    assert code == EXIT_MISMATCH and not check["ok"] and check["value"] == "inf"


def test_a_kernel_that_faults_is_named_and_the_lost_context_stops_the_rest(tmp_path, tiny_path,
                                                                          monkeypatch):
    """A fault is reported at a sync, with no kernel name, and loses the context: verify waits
    after each launch, so the one error names the kernel; every later check is "not run"."""
    def fault(mem, e, a, grid):
        raise cuda_fake_kernels.EmulationError("out of bounds")

    monkeypatch.setitem(cuda_fake_kernels.EMULATORS, "rope", fault)
    code, report, text = verify(tmp_path, FakeDriver(), model=str(tiny_path))
    assert code == EXIT_MISMATCH and report["status"] == "fail"
    checks = report["checks"]
    assert [c["name"] for c in checks[:3]] == ["rmsnorm_f32", "rmsnorm_f32 per head (hd 256)",
                                               "rope kernels"]
    assert all(c["ok"] for c in checks[:2])
    err = [c for c in checks if c["metric"] == "error"]
    assert len(err) == 1 and "CUDA_ERROR_ILLEGAL_ADDRESS (kernel rope_norm_d64, grid" in err[0]["detail"]
    rest = checks[3:]
    assert {c["level"] for c in rest} == {"kernel", "layer", "e2e"}
    assert all(c["metric"] == "not run" and not c["ok"] and c["detail"] == "not run: the GPU "
               "context was lost at rope kernels (CUDA_ERROR_ILLEGAL_ADDRESS)" for c in rest)
    assert "verify: fail" in text


@pytest.mark.parametrize("driver, words", [
    (FakeDriver(library_missing=True), "libcuda"),
    (FakeDriver(devices=[]), "CUDA_ERROR_NO_DEVICE"),
    (FakeDriver(devices=[FakeDevice(cc=(7, 0))]), "sm_80 or newer"),
])
def test_no_gpu_exits_2_and_says_what_was_checked(tmp_path, driver, words):
    code, report, text = verify(tmp_path, driver)
    assert code == EXIT_NO_GPU and report["status"] == "no_gpu"
    assert words in report["message"] and "checked instead" in text
    assert report["checks"] and all(c["level"] == "manifest" and c["ok"] for c in report["checks"])


def test_cli_on_this_machine_without_a_gpu(tmp_path, capsys):
    from ukgpu.gpu.cuda.select import probe

    if probe()[0]:
        pytest.skip("this machine has a usable GPU: the no-GPU exit path is not reachable")
    out = tmp_path / "v.json"
    assert main(["verify", "--kernels", "--json", str(out)]) == EXIT_NO_GPU
    assert json.loads(out.read_text())["status"] == "no_gpu"
    assert "no usable CUDA GPU" in capsys.readouterr().out
