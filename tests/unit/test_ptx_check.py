"""`ukgpu ptx check` on the committed artifacts, and on copies broken on purpose."""

import json
import shutil

import pytest

from ukgpu.ptx_kernels.check import check, find_ptxas, ptx_entry_params
from ukgpu.ptx_kernels.loader import BUILD_DIR
from ukgpu.tools.cli import main


def test_committed_artifacts_pass_the_full_check(capsys):
    rc = main(["ptx", "check"])  # its time is a benchmark's business, not this test's
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "0 problem(s)" in out.out


@pytest.fixture
def broken(tmp_path):
    dst = tmp_path / "build"
    shutil.copytree(BUILD_DIR, dst)
    return dst


def _manifest(d, target):
    return json.loads((d / target / "manifest.json").read_text())


def test_detects_a_param_list_that_differs_from_the_ptx(broken):
    man = _manifest(broken, "sm_80")
    man["entries"]["add_f32"]["params"].insert(3, {"name": "extra", "type": "i32", "hidden": False,
                                                     "divisibility": 0, "unused": False})
    (broken / "sm_80" / "manifest.json").write_text(json.dumps(man))
    problems = check(broken, run_ptxas=False)
    assert any("sm_80/add_f32: PTX params" in p for p in problems), problems


def test_detects_missing_cubin_corrupt_ptx_and_stale_hash(broken):
    (broken / "sm_90a" / "rmsnorm_f32.cubin").unlink()
    ptx = broken / "sm_80" / "swiglu_f32.ptx"
    ptx.write_text(ptx.read_text().replace("ret;", "bogus.instruction;", 1))
    man = _manifest(broken, "sm_80")
    man["entries"]["argmax_f32"]["sources"]["elementwise.py"] = "0" * 64
    (broken / "sm_80" / "manifest.json").write_text(json.dumps(man))
    problems = check(broken, run_ptxas=True)
    text = "\n".join(problems)
    assert "sm_90a/rmsnorm_f32: missing cubin" in text
    assert "sm_80/swiglu_f32: ptx sha256 differs" in text
    assert "sm_80/swiglu_f32.ptx: ptxas -arch sm_80 failed" in text
    assert "sm_80/argmax_f32: stale" in text


def test_cli_exits_non_zero_with_the_list_of_problems(broken, capsys):
    shutil.rmtree(broken / "sm_90a")
    assert main(["ptx", "check", "--build-dir", str(broken), "--no-ptxas"]) == 1
    err = capsys.readouterr().err
    assert "sm_90a: no manifest" in err


def test_ptx_entry_parser():
    ptx = (".visible .entry k(\n .param .u64 .ptr .global .align 1 k_param_0,\n"
           " .param .u32 k_param_1,\n .param .f32 k_param_2\n)\n.reqntid 128\n{ ret; }")
    assert ptx_entry_params(ptx) == ("k", [".u64", ".u32", ".f32"])


def test_falls_back_to_tritons_bundled_ptxas(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    bundled = find_ptxas()
    assert bundled is not None and bundled.endswith("backends/nvidia/bin/ptxas")
