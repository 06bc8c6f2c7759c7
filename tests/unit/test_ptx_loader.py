"""Launch descriptions from the committed manifests alone (ptx_kernels/loader.py)."""

import ctypes
import re
import subprocess
import sys

import pytest

from ukgpu.ptx_kernels.loader import (
    STATIC_SHARED_LIMIT,
    KernelManifestError,
    Manifests,
    attention_entries,
    embedding_entry,
    evaluate,
    gemm_entry,
    matvec_entry,
    param_ctype,
    rope_entry,
)
from ukgpu.ptx_kernels.repack import FORMATS


@pytest.fixture(scope="module")
def man():
    return Manifests.load()


def test_loader_imports_without_cuda_or_triton():
    code = ("import sys; import ukgpu.ptx_kernels.loader as l; l.Manifests.load(); "
            "bad = [m for m in ('triton', 'torch', 'cuda', 'cuda.bindings') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_artifact_selection_by_compute_capability(man):
    h100 = man.select("matvec_q4_k_b1", (9, 0))
    assert (h100.target, h100.kind) == ("sm_90a", "cubin") and h100.path.exists()
    for cc in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)]:
        art = man.select("gemm_q8_0", cc)
        assert (art.target, art.kind) == ("sm_80", "ptx"), cc
        assert art.path.read_text().lstrip().startswith("//")
    with pytest.raises(KernelManifestError, match="7.5"):
        man.select("gemm_q8_0", (7, 5))


def test_launch_packs_params_in_order_with_hidden_zeros(man):
    e = man.entry("matvec_q4_k_b1")
    vals = {"w_q": 0x1000, "w_s": 0x2000, "w_m": 0x3000, "x": 0x4000, "y": 0x5000,
            "N": 4100, "K": 4096, "B": 3}
    launch = e.launch(vals)
    assert launch.grid == (-(-4100 // e.constexprs["BLOCK_N"]), 3, 1)
    assert launch.block == (e.data["num_warps"] * 32, 1, 1)
    names = [p.name for p in e.params]
    assert names == ["w_q", "w_s", "w_m", "x", "y", "N", "K", "B", "global_scratch", "profile_scratch"]
    assert [v for _, v in launch.args] == [0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 4100, 4096, 3, 0, 0]
    values, types = launch.ctypes_args()
    assert types[:5] == (ctypes.c_void_p,) * 5 and types[5:8] == (ctypes.c_int32,) * 3
    assert len(values) == len(types) == 10


def test_unused_planes_may_be_omitted_and_floats_pack_as_float(man):
    e = man.entry("attn_decode_d128")
    vals = {"q": 16, "k_cache": 32, "v_cache": 48, "part_out": 64, "part_ml": 80, "slots": 96,
            "lens": 112, "n_ctx": 4096, "chunk": 256, "Hq": 12, "Hkv": 2, "scale": 0.088, "window": 0, "B": 4, "S": 16}
    launch = e.launch(vals)
    assert launch.grid == (4, 2, 16)  # (B, Hkv, S): one program per kv head and split
    _, types = launch.ctypes_args()
    assert types[11] is ctypes.c_float
    with pytest.raises(KernelManifestError, match="S \\* chunk >= n_ctx"):
        e.launch(vals | {"S": 8})
    q8 = man.entry("matvec_q8_0_b8")
    assert [p.name for p in q8.params if p.unused and not p.hidden] == ["w_m"]
    q8.launch({"w_q": 16, "w_s": 32, "x": 48, "y": 64, "N": 10, "K": 64, "B": 8})


@pytest.mark.parametrize("vals,why", [
    ({"K": 4000}, "K % 256"),  # Q4_K needs whole super-blocks
    ({"B": 9}, "B <= 8"),
    ({"x": 0x4004}, "x % 16"),  # pointers compiled as 16-byte aligned
])
def test_launch_enforces_limits_and_alignment(man, vals, why):
    base = {"w_q": 0x1000, "w_s": 0x2000, "w_m": 0x3000, "x": 0x4000, "y": 0x5000,
            "N": 64, "K": 4096, "B": 1}
    with pytest.raises(KernelManifestError, match=re.escape(why)):
        man.entry("matvec_q4_k_b1").launch(base | vals)


def test_missing_values_and_shared_memory_opt_in(man):
    e = man.entry("gemm_q4_k", "sm_90a")
    with pytest.raises(KernelManifestError, match="missing"):
        e.launch({"w_q": 16})
    assert e.shared_bytes > 0 and e.data["needs_opt_in_shared"] == (e.shared_bytes > STATIC_SHARED_LIMIT)


def test_every_manifest_parameter_type_has_its_launch_type(man):
    types = {p.type for n in man.names() for p in man.entry(n).params}
    assert {param_ctype(t) for t in types} == {ctypes.c_void_p, ctypes.c_int32, ctypes.c_float}
    with pytest.raises(KernelManifestError, match="'i64' has no launch type"):
        param_ctype("i64")


def test_every_entry_exists_for_both_targets_with_a_grid_and_limits(man):
    names = man.names()
    assert len(names) >= 40
    for target in ("sm_80", "sm_90a"):
        for n in names:
            e = man.entry(n, target)
            assert len(e.grid_exprs) == 3 and e.params[-1].hidden and e.params[-2].hidden


def test_expression_evaluator_is_closed():
    assert evaluate("cdiv(N, 8) * 2", {"N": 17}) == 6
    assert evaluate("1 <= B <= 8", {"B": 8}) is True
    with pytest.raises(KernelManifestError):
        evaluate("__import__('os')", {})
    with pytest.raises(KernelManifestError, match="size 'T'"):
        evaluate("T", {})


def test_name_helpers_cover_every_supported_type_and_head_size(man):
    names = set(man.names())
    for qtype in FORMATS:
        assert {matvec_entry(qtype, 1), matvec_entry(qtype, 8), gemm_entry(qtype),
                embedding_entry(qtype)} <= names
    for hd in (32, 64, 96, 128, 256):
        assert {rope_entry(True, hd), rope_entry(False, hd), *attention_entries(hd).values()} <= names
    assert rope_entry(False, 96) == "rope_norm_d128"  # partial / odd sizes: the next entry up
    for bad in (1, 97, 512):
        with pytest.raises(KernelManifestError, match="rope"):
            rope_entry(True, bad)
    with pytest.raises(KernelManifestError, match="head_dim 80"):
        attention_entries(80)
    assert matvec_entry("Q4_K", 5) == "matvec_q4_k_b8"
    with pytest.raises(KernelManifestError, match="GEMM"):
        matvec_entry("Q4_K", 9)
