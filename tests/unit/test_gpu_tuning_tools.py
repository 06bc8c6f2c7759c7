"""The GPU tuning tools' host-side logic: a sweep variant rewrites the geometry everywhere the
launch reads it (constexprs and grid), the agreement check catches a wrong kernel, and the
profile summary totals ncu's CSV per kernel and grid."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "dev"))  # host-side scripts, not in the wheel
import kernel_sweep  # noqa: E402
import profile_decode  # noqa: E402

from ukgpu.ptx_kernels.catalog import all_specs  # noqa: E402


def spec(name):
    return next(s for s in all_specs() if s.name == name)


def test_a_variant_moves_block_n_into_every_grid_term():
    qkv = kernel_sweep._variant_spec(spec("matvec_qkv_q4_k_b1"), (8, 1024, 8, 2))
    assert qkv.constexprs["BLOCK_N"] == 8 and qkv.constexprs["BLOCK_K"] == 1024
    assert qkv.grid[0] == "cdiv(N0, 8) + cdiv(N1, 8) + cdiv(N2, 8)"
    assert (qkv.num_warps, qkv.num_stages) == (8, 2)
    glu = kernel_sweep._variant_spec(spec("matvec_glu_q6_k_b1"), (2, 512, 4, 1))
    assert glu.grid[0] == "cdiv(N, 2)" and glu.constexprs["BLOCK_B"] == 1


def test_agreement_names_a_diverging_variant():
    ref = {"tokens": [1, 2, 3, 4], "tokens_long": [5, 6], "top8": [[7, 1.0], [9, 0.5]]}
    assert kernel_sweep._agreement(ref, ref) == "agree 4/4+2/2 top8 same max|d| 0.00e+00"
    bad = {"tokens": [1, 2, 8, 4], "tokens_long": [5, 6], "top8": [[9, 1.0], [7, 0.5]]}
    assert kernel_sweep._agreement(ref, bad).startswith("agree 2/4+2/2 top8 DIFFER")


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
