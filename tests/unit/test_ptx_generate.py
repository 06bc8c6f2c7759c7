"""The generator is deterministic and reproduces the committed artifacts byte for byte.

Runs `ukgpu ptx build --only ...` in subprocesses (Triton compiles there, never in this
interpreter, whose kernel tests need TRITON_INTERPRET=1).
"""

import json
import os
import subprocess
import sys

from ukgpu.ptx_kernels.loader import BUILD_DIR

ONLY = ["rmsnorm_f32", "matvec_q4_k_b1", "attn_decode_d64"]


def _build(out):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "ukgpu.tools.cli", "ptx", "build", "--out", str(out),
                    "--only", *ONLY], check=True, env=env, capture_output=True, timeout=600)


def test_two_builds_are_identical_and_match_the_committed_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _build(a)
    _build(b)
    for target in ("sm_80", "sm_90a"):
        files = sorted(p.name for p in (a / target).iterdir())
        assert files == sorted(p.name for p in (b / target).iterdir())
        assert len(files) == len(ONLY) * (2 if target == "sm_90a" else 1) + 1
        for name in files:
            assert (a / target / name).read_bytes() == (b / target / name).read_bytes(), name
        committed = json.loads((BUILD_DIR / target / "manifest.json").read_text())["entries"]
        fresh = json.loads((a / target / "manifest.json").read_text())["entries"]
        for name in ONLY:
            assert fresh[name] == committed[name], f"{target}/{name} differs: run `ukgpu ptx build`"
            for art in fresh[name]["artifacts"].values():
                rebuilt = (a / target / art["file"]).read_bytes()
                assert rebuilt == (BUILD_DIR / target / art["file"]).read_bytes(), art["file"]


def _stale(out, only):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "ukgpu.tools.cli", "ptx", "build", "--out", str(out),
                           "--stale", "--only", *only], check=True, env=env, capture_output=True,
                          text=True, timeout=600)
    return done.stdout


def test_a_stale_build_compiles_only_what_changed_and_drops_what_is_gone(tmp_path):
    only = ["rmsnorm_f32", "add_f32"]
    assert "sm_90a: compiling 2 entries, 0 fresh" in _stale(tmp_path, only)
    before = {p.name: p.read_bytes() for p in (tmp_path / "sm_90a").iterdir()}
    assert "sm_90a: compiling 0 entries, 2 fresh" in _stale(tmp_path, only)
    (tmp_path / "sm_90a" / "add_f32.cubin").write_bytes(b"not the built cubin")
    (tmp_path / "sm_80" / "leftover.ptx").write_text("// no entry names this file\n")
    out = _stale(tmp_path, only)
    assert "sm_90a: compiling 1 entries, 1 fresh" in out and "sm_80: compiling 0 entries, 2 fresh" in out
    assert {p.name: p.read_bytes() for p in (tmp_path / "sm_90a").iterdir()} == before  # same bytes again
    assert not (tmp_path / "sm_80" / "leftover.ptx").exists()
    assert "sm_90a: compiling 0 entries, 1 fresh" in _stale(tmp_path, ["add_f32"])  # rmsnorm_f32 dropped
    assert sorted(json.loads((tmp_path / "sm_90a" / "manifest.json").read_text())["entries"]) == ["add_f32"]
    assert not (tmp_path / "sm_90a" / "rmsnorm_f32.cubin").exists()
