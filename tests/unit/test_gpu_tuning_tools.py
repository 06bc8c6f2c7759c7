"""The GPU tuning tools' host-side logic: a sweep variant rewrites the geometry everywhere the
launch reads it (constexprs and grid), the agreement check catches a wrong kernel, and the
profile summary totals ncu's CSV per kernel and grid; a variant of another build's kernels takes
that build's changed cubins and nothing it could not launch."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "dev"))  # host-side scripts, not in the wheel
import kernel_sweep  # noqa: E402
import profile_decode  # noqa: E402

from ukgpu.ptx_kernels.catalog import all_specs  # noqa: E402
from ukgpu.ptx_kernels.loader import Manifests  # noqa: E402


def spec(name):
    return next(s for s in all_specs() if s.name == name)


def test_a_variant_moves_block_n_into_every_grid_term():
    qkv = kernel_sweep._variant_spec(spec("matvec_qkv_q4_k_b1"), (8, 1024, 8, 2))
    assert qkv.constexprs["BLOCK_N"] == 8 and qkv.constexprs["BLOCK_K"] == 1024
    assert qkv.grid[0] == "cdiv(N0, 8) + cdiv(N1, 8) + cdiv(N2, 8)"
    assert (qkv.num_warps, qkv.num_stages) == (8, 2)
    glu = kernel_sweep._variant_spec(spec("matvec_glu_q6_k_b1"), (2, 512, 4, 1))
    assert glu.grid[0] == "cdiv(N, 2)" and glu.constexprs["BLOCK_B"] == 1


def test_a_gemm_variant_moves_its_tile_into_both_grid_terms():
    gemm = kernel_sweep._gemm_variant_spec(spec("gemm_q4_k"), (128, 32, 128, 8, 2))
    assert (gemm.constexprs["BLOCK_M"], gemm.constexprs["BLOCK_N"], gemm.constexprs["BLOCK_K"]) == (128, 32, 128)
    assert gemm.grid == ("cdiv(M, 128)", "cdiv(N, 32)", "1") and (gemm.num_warps, gemm.num_stages) == (8, 2)
    assert gemm.constexprs["X_EXP_SHIFT"] == spec("gemm_q4_k").constexprs["X_EXP_SHIFT"]


def test_a_gemm_variant_retiles_the_fused_gemms_too():
    qkv = kernel_sweep._gemm_variant_spec(spec("gemm_qkv_q4_k"), (128, 128, 64, 8, 3))
    assert qkv.grid == ("cdiv(M, 128)", "cdiv(N0, 128) + cdiv(N1, 128) + cdiv(N2, 128)", "1")
    glu = kernel_sweep._gemm_variant_spec(spec("gemm_glu_q4_k"), (128, 128, 64, 8, 3))
    assert glu.constexprs["BLOCK_N"] == 64 and glu.grid == ("cdiv(M, 128)", "cdiv(N, 64)", "1")


def test_agreement_names_a_diverging_variant():
    ref = {"tokens": [1, 2, 3, 4], "tokens_long": [5, 6], "top8": [[7, 1.0], [9, 0.5]],
           "pp_top8": [[3, 2.0], [4, 1.0]]}
    assert kernel_sweep._agreement(ref, ref) == ("agree 4/4+2/2 top8 same max|d| 0.00e+00 "
                                                 "pp top8 same max|d| 0.00e+00")
    bad = {"tokens": [1, 2, 8, 4], "tokens_long": [5, 6], "top8": [[9, 1.0], [7, 0.5]],
           "pp_top8": [[4, 2.0], [3, 1.5]]}
    assert kernel_sweep._agreement(ref, bad) == ("agree 2/4+2/2 top8 DIFFER max|d| 0.00e+00 "
                                                 "pp top8 DIFFER max|d| 5.00e-01")
    older = {k: v for k, v in ref.items() if k != "pp_top8"}  # a row measured before pp was
    assert kernel_sweep._agreement(ref, older).endswith("pp top8 -")


def test_the_profile_summary_totals_per_kernel_and_grid(tmp_path):
    csv = tmp_path / "ncu.csv"
    csv.write_text('==PROF== Connected to process\n'
                   '"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"\n'
                   '"0","matvec_fused_kernel","(384, 1, 1)","gpu__time_duration.sum","nsecond","5,000"\n'
                   '"1","matvec_fused_kernel","(1120, 1, 1)","gpu__time_duration.sum","nsecond","20000"\n'
                   '"2","matvec_fused_kernel","(384, 1, 1)","gpu__time_duration.sum","usecond","15"\n'
                   '"3","matvec_fused_kernel","(384, 1, 1)","sm__cycles","cycle","99"\n')
    out = profile_decode.summarize(csv).splitlines()
    assert out[0] == "3 kernels, 40.0 us of kernel time"
    assert out[3] == "| matvec_fused_kernel grid (384, 1, 1) | 2 | 20.0 | 10.00 | 50.0% |"
    assert out[4] == "| matvec_fused_kernel grid (1120, 1, 1) | 1 | 20.0 | 20.00 | 50.0% |"


def _shipped_sm90a() -> dict:
    return json.loads((kernel_sweep.SHIPPED / "sm_90a" / "manifest.json").read_text())


def test_a_variant_of_another_build_takes_its_changed_cubins_and_points_back_for_the_rest(tmp_path):
    before = copy.deepcopy(_shipped_sm90a())
    changed, other_type, new_args = "matvec_glu_q4_k_b1", "matvec_glu_q5_k_b1", "matvec_qkv_q6_k_b1"
    untyped = "attn_decode_rope_neox_d128"  # no weight type ("" in the manifest): taken too
    files = {}
    for name in (changed, other_type, new_args, untyped):
        data = f"cubin of {name} before".encode()
        files[f"{name}.cubin"] = data
        before["entries"][name]["artifacts"] = {
            "cubin": {"file": f"{name}.cubin", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
            "ptx": {"file": f"{name}.ptx", "sha256": "0" * 64, "bytes": 1}}
    before["entries"][changed]["constexprs"] = {**before["entries"][changed]["constexprs"], "BLOCK_N": 8}
    before["entries"][new_args]["params"] = before["entries"][new_args]["params"][:-1]
    report = kernel_sweep.variant_from_manifest("before", before, files.__getitem__, tmp_path)
    assert sorted(report["taken"]) == [untyped, changed]
    assert report["kept_shipped"] == [f"{new_args}: arguments differ"]

    man = Manifests.load(tmp_path / "before")
    art = man.select(changed, (9, 0))
    assert art.kind == "cubin" and art.path.read_bytes() == files[f"{changed}.cubin"]
    assert man.entry(changed).constexprs["BLOCK_N"] == 8  # the other build's launch geometry
    assert [a.kind for a in man.candidates(changed, (9, 0))] == ["cubin"]  # no PTX travels
    shipped = Manifests.load(kernel_sweep.SHIPPED)
    for name in (other_type, new_args, "attn_decode_d64"):  # not a benchmark type / not launchable / same
        assert man.select(name, (9, 0)).path.resolve() == shipped.select(name, (9, 0)).path.resolve()


def test_a_variant_refuses_a_cubin_that_is_not_its_manifests(tmp_path):
    before = copy.deepcopy(_shipped_sm90a())
    name = "matvec_glu_q4_k_b1"
    before["entries"][name]["artifacts"] = {"cubin": {"file": "x.cubin", "sha256": "0" * 64, "bytes": 3}}
    with pytest.raises(SystemExit, match="x.cubin does not match"):
        kernel_sweep.variant_from_manifest("bad", before, lambda f: b"abc", tmp_path)
    with pytest.raises(SystemExit, match="format/arch"):
        kernel_sweep.variant_from_manifest("bad", {**before, "arch": [8, 0]}, lambda f: b"", tmp_path)


def test_a_variant_from_a_missing_commit_says_which(tmp_path):
    with pytest.raises(SystemExit, match="git show no-such-rev:ptx_kernels/build/sm_90a/manifest.json"):
        kernel_sweep.variant_from_rev("no-such-rev", tmp_path)


def test_the_stand_in_driver_knows_the_images_of_the_build_the_loader_reads(tmp_path, monkeypatch):
    """A variant's cubins load under the stand-in (the dry run of the sweep): the fake driver
    indexes the build UKGPU_KERNELS_DIR names, as the loader reads it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.cuda_driver import FakeDriver

    monkeypatch.setenv("UKGPU_KERNELS_DIR", str(tmp_path))
    assert FakeDriver().build_dir == tmp_path
    monkeypatch.delenv("UKGPU_KERNELS_DIR")
    assert FakeDriver().build_dir == kernel_sweep.SHIPPED


def test_the_prefill_host_share_times_each_launch_and_puts_the_method_back():
    class Kernels:
        def launch(self, name, values, stream=None, sync=None):
            time.sleep(0.002)

    be = SimpleNamespace(kernels=Kernels())

    def forward():
        for _ in range(3):
            be.kernels.launch("k", {})
        time.sleep(0.01)  # the device's tail after the last launch

    got = kernel_sweep._prefill_host_share(be, forward)
    assert got["launches"] == 3 and 6 <= got["launch_ms"] < got["wall_ms"]
    assert got["wall_ms"] - got["launch_ms"] >= 10
    assert "launch" not in vars(be.kernels)  # the class's method again
