"""What a benchmark ran on: CPU, memory, OS, GPU, package versions, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ukgpu", "numpy", "numba", "gguf", "torch", "cuda-python", "triton")


def machine_info() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        **_cpu_id(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_bytes": _mem_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_info(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the instruction sets the CPU kernels' speed depends on (numba's LLVM and llama.cpp's ggml pick
# their code paths from these): reported beside every figure, since the same "AMD EPYC" name
# covers a 128-bit-datapath Zen 1 and an AVX-512 Zen 4
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "amx_tile")


def _cpu_id() -> dict[str, Any]:
    """{"cpu_id": "vendor family F model M", "cpu_simd": [flags of SIMD_FLAGS present]} from
    /proc/cpuinfo; empty where it cannot be read."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return {}
    flags = set(fields.get("flags", "").split())
    return {"cpu_id": f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
                      f"model {fields.get('model', '?')}",
            "cpu_simd": [f for f in SIMD_FLAGS if f in flags]}


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_info() -> dict[str, Any]:
    """{"available": True, "name", "driver", "cuda", "memory_bytes"} or {"available": False, "reason"}."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"available": False, "reason": "no nvidia-smi on PATH (no NVIDIA driver on this machine)"}
    query = "name,driver_version,memory.total"
    try:
        out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "reason": f"nvidia-smi failed: {exc}"}
    first = out.strip().splitlines()[0] if out.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) < 3:
        return {"available": False, "reason": f"nvidia-smi listed no GPU ({out.strip()!r})"}
    return {"available": True, "name": parts[0], "driver": parts[1], "cuda": _cuda_version(smi),
            "memory_bytes": int(float(parts[2])) * 2**20}


def _cuda_version(smi: str) -> str | None:
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for token in out.split("CUDA Version:")[1:2]:
        return token.split()[0]
    return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(changes) if changes is not None else None}
