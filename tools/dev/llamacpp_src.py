"""llama.cpp sources for the GPU kit: trim a tree to what building llama-bench needs
(`gpu_check.py pack-llamacpp`), find and unpack one, and build llama-bench with CUDA for this GPU
(the kit's fallback when no prebuilt llama-bench archive came along: 6-12 minutes on a GPU machine).
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TextIO

# Parts of a llama.cpp tree that building llama-bench never reads (with tests, examples and the
# server off); the ggml backends other than the CPU and CUDA ones are only added when enabled.
PACK_SKIP_DIRS = {"models", "docs", "media", "examples", "tests", "gguf-py", "pocs", "benches",
                  "ci", "scripts", "conversion", "grammars", "requirements",
                  ".git", ".github", ".devops", "tools/ui", "tools/server/public",
                  "tools/server/webui"}
PACK_KEEP_GGML = {"ggml-cpu", "ggml-cuda", "ggml-blas"}


class CheckError(Exception):
    """A step cannot run (a missing input or tool); its message says what to do."""


def _skip_member(rel: str) -> bool:
    parts = rel.split("/")
    if any("/".join(parts[:i + 1]) in PACK_SKIP_DIRS for i in range(len(parts))):
        return True
    # ggml/src/ggml-<backend>/...: a backend's folder (files directly in ggml/src stay)
    return len(parts) >= 4 and parts[:2] == ["ggml", "src"] and parts[2].startswith("ggml-") \
        and parts[2] not in PACK_KEEP_GGML


def find_llamacpp_root(src: Path) -> Path:
    """The llama.cpp tree in `src`: itself, its vendor/llama.cpp (llama-cpp-python), or the one
    directory below it that is either."""
    for cand in (src, src / "vendor" / "llama.cpp"):
        if (cand / "CMakeLists.txt").is_file() and (cand / "ggml").is_dir():
            return cand
    subdirs = [d for d in src.iterdir() if d.is_dir()] if src.is_dir() else []
    if len(subdirs) == 1:
        return find_llamacpp_root(subdirs[0])
    raise CheckError(f"{src} holds no llama.cpp tree (CMakeLists.txt + ggml/, or vendor/llama.cpp)")


def unpack(src: Path, into: Path) -> Path:
    """A source directory as is, or an archive (.tar.gz/.tar.xz sdist or pack) extracted into `into`."""
    if src.is_dir():
        return find_llamacpp_root(src)
    if not src.is_file():
        raise CheckError(f"--llama-cpp {src}: no such file or directory")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tar:
        tar.extractall(into, filter="data")
    return find_llamacpp_root(into)


def pack_llamacpp(src: Path, out: Path) -> tuple[int, int]:
    """Write the trimmed tree of `src` to `out` (.tar.xz); (files, bytes written)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(src, Path(tmp) / "src")
        files = 0
        with tarfile.open(out, "w:xz") as tar:
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root).as_posix()
                if path.is_dir() or _skip_member(rel):
                    continue
                tar.add(path, arcname=f"llama.cpp/{rel}", recursive=False)
                files += 1
    return files, out.stat().st_size


def cuda_arch(log) -> str:
    """The GPU's compute capability as CMake wants it (90a for sm_90, else e.g. 80)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True)
        caps = out.stdout.split()
        if out.returncode == 0 and caps:
            cap = caps[0].replace(".", "")
            return f"{cap}a" if cap == "90" else cap
        log.write(out.stdout + out.stderr)
    raise CheckError("cannot read the GPU's compute capability from nvidia-smi")


def build_llama_bench(src: Path, build_dir: Path, log: TextIO) -> Path:
    """llama-bench built with CUDA for this GPU from `src` (tree, sdist or pack) under build_dir."""
    for tool in ("cmake", "nvcc"):
        if not shutil.which(tool):
            raise CheckError(f"{tool} is not on PATH: llama-bench with CUDA needs the CUDA toolkit and CMake")
    root = unpack(src, build_dir / "src")
    arch = cuda_arch(log)
    build = build_dir / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in (["cmake", "-S", str(root), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_NATIVE=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                ["cmake", "--build", str(build), "--target", "llama-bench", "-j", "16"]):
        log.flush()
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise CheckError(f"`{' '.join(cmd[:3])}...` failed (see the log)")
    found = sorted(build.rglob("llama-bench"))
    if not found:
        raise CheckError(f"the build finished but no llama-bench binary is under {build}")
    return found[0]
