"""tools/dev/gpu_check.py without a GPU: the llama.cpp source packing and the phase runner's
bookkeeping (the phases themselves run under the stand-in driver in
tests/integration/test_cuda_real_bindings.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "dev"))  # host-side scripts, not in the wheel
import gpu_check  # noqa: E402


def _tree(root: Path, files: list[str]) -> Path:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


LLAMA_FILES = ["CMakeLists.txt", "ggml/CMakeLists.txt", "ggml/src/ggml.c", "ggml/src/ggml-version.h.in",
               "ggml/src/ggml-cuda/mmq.cu", "ggml/src/ggml-cpu/ops.cpp", "ggml/src/ggml-metal/x.m",
               "ggml/src/ggml-vulkan/y.cpp", "src/llama.cpp", "common/common.cpp",
               "tools/llama-bench/llama-bench.cpp", "tools/ui/index.js", "models/ggml-vocab.gguf",
               "docs/build.md", "tests/test-x.cpp", "vendor/nlohmann/json.hpp", "LICENSE"]


def test_pack_keeps_what_llama_bench_builds_from_and_drops_the_rest(tmp_path):
    src = _tree(tmp_path / "sdist" / "llama_cpp_python-9" / "vendor" / "llama.cpp", LLAMA_FILES)
    sdist = tmp_path / "llama_cpp_python-9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "sdist" / "llama_cpp_python-9", arcname="llama_cpp_python-9")
    out = tmp_path / "pack.tar.xz"
    files, size = gpu_check.pack_llamacpp(sdist, out)
    with tarfile.open(out) as tar:
        names = sorted(m.name.removeprefix("llama.cpp/") for m in tar.getmembers())
    assert names == sorted(["CMakeLists.txt", "ggml/CMakeLists.txt", "ggml/src/ggml.c",
                            "ggml/src/ggml-version.h.in", "ggml/src/ggml-cuda/mmq.cu",
                            "ggml/src/ggml-cpu/ops.cpp", "src/llama.cpp", "common/common.cpp",
                            "tools/llama-bench/llama-bench.cpp", "vendor/nlohmann/json.hpp", "LICENSE"])
    assert files == len(names) and size == out.stat().st_size
    # a pack unpacks to a tree the runner finds again
    assert gpu_check.unpack(out, tmp_path / "again") == tmp_path / "again" / "llama.cpp"
    assert gpu_check.find_llamacpp_root(src) == src


def test_a_folder_without_llama_cpp_is_a_clear_error(tmp_path):
    _tree(tmp_path / "x", ["README.md", "a/b.txt"])
    with pytest.raises(gpu_check.CheckError, match="holds no llama.cpp tree"):
        gpu_check.find_llamacpp_root(tmp_path / "x")
    with pytest.raises(gpu_check.CheckError, match="no such file"):
        gpu_check.unpack(tmp_path / "missing.tar.gz", tmp_path / "y")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "dev" / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_failed_phases_are_recorded_and_the_next_ones_still_run(tmp_path):
    out = tmp_path / "out"
    done = _run(tmp_path, "run", "-o", str(out), "--phases", "llamacpp,bench-cuda",
                "--build-dir", str(tmp_path / "b"), "--python", "/nonexistent/python3")
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["phase"], r["status"]) for r in summary] == [("llamacpp", "failed"), ("bench-cuda", "failed")]
    assert "no --llama-cpp SRC given" in summary[0]["detail"]
    assert "/nonexistent/python3: not found" in summary[1]["detail"]
    assert "FAILED" in (out / "bench-cuda.log").read_text()


def test_unknown_phase_is_refused_before_anything_runs(tmp_path):
    done = _run(tmp_path, "run", "-o", str(tmp_path / "out"), "--phases", "tests,warp-drive")
    assert done.returncode == 2 and "warp-drive" in done.stderr
    assert not (tmp_path / "out").exists()
