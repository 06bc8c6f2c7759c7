"""Peer implementations measured beside ukgpu: llama.cpp, once per device.

Two peers, each compared with the ukgpu backend on the same device:
  llamacpp       llama.cpp on the CPU (no layer offloaded, no GPU device), against `cpu`
  llamacpp-cuda  llama.cpp with every layer on the GPU, against `cuda`
Both run with the same threads as ukgpu.

Ways to reach llama.cpp, tried in this order:
  1. a `llama-bench` binary named with `--llama-bench PATH`;
  2. llama-cpp-python in some interpreter: `--peer-python PY`, else this
     interpreter when `import llama_cpp` works.  The measurement runs in that
     interpreter as a subprocess (`peer_llamacpp.py`), so llama.cpp may live in
     a separate virtualenv.  Install it with `pip install llama-cpp-python==0.3.36`
     (it compiles llama.cpp: ~12 minutes on 2 cores);
  3. a `llama-bench` binary on PATH, run with `-o json`.
`llamacpp-cuda` needs a llama.cpp built with CUDA: llama-cpp-python must report
GPU offload, and llama-bench's JSON rows must name the CUDA backend and a GPU;
otherwise its entry is unavailable and says how to build one.  Each entry's
`info` records what the peer reported about its device (backends, GPU, layers
offloaded).  A peer that is not reachable becomes an unavailable entry that says
how to get it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ukgpu.tools.bench.backend_run import RunConfig
from ukgpu.tools.bench.schema import Entry, Result

SCRIPT = Path(__file__).with_name("peer_llamacpp.py")
PEER_DEVICE = {"llamacpp": "cpu", "llamacpp-cuda": "cuda"}  # peer name -> device it runs on
BACKEND_PEER = {device: name for name, device in PEER_DEVICE.items()}  # device -> its llama.cpp peer
# ukgpu backend -> the device it runs on ("cpu-q8": the CPU backend rounding activations to 8 bits)
BACKEND_DEVICE = {"cpu": "cpu", "cpu-q8": "cpu", "cuda": "cuda"}
LLAMA_BENCH_LAYERS = {"cpu": 0, "cuda": 99}  # llama-bench -ngl
PYTHON_LAYERS = {"cpu": 0, "cuda": -1}  # llama-cpp-python n_gpu_layers (-1: all of them)
INSTALL_HINT = ("install llama-cpp-python (`pip install llama-cpp-python==0.3.36`, ~12 min build) and pass "
                "--peer-python PYTHON for a separate virtualenv, or pass --llama-bench PATH (or put a "
                "`llama-bench` binary on PATH)")
CUDA_HINT = ("build llama.cpp with CUDA (`cmake -B build -DGGML_CUDA=ON && cmake --build build --target "
             "llama-bench`) and pass --llama-bench build/bin/llama-bench, or reinstall llama-cpp-python with "
             "CUDA (`CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall --no-cache-dir "
             "llama-cpp-python==0.3.36`)")


@dataclass(frozen=True)
class PeerTool:
    how: str  # "python" or "llama-bench"
    path: str  # interpreter or binary
    version: str | None
    device: str  # "cpu" or "cuda"
    takes_device_flag: bool = False  # llama-bench knows `-dev none` (keeps a GPU build off the GPU)


class PeerFailed(Exception):
    """The peer ran but gave no usable measurement; the message becomes the entry's reason."""


def find_llamacpp(device: str, peer_python: str | None = None, llama_bench: str | None = None) -> PeerTool | str:
    """The way to run llama.cpp on `device` ("cpu" or "cuda") here, or the reason there is none."""
    if llama_bench:
        return _llama_bench_tool(llama_bench, device, "--llama-bench ")
    if peer_python:
        return _python_tool(peer_python, device, f"--peer-python {peer_python}: ")
    found = None
    if importlib.util.find_spec("llama_cpp") is not None:
        found = _python_tool(sys.executable, device, f"{sys.executable}: ")
        if isinstance(found, PeerTool):
            return found
    binary = shutil.which("llama-bench")
    if binary:
        return _llama_bench_tool(binary, device, "")
    return found or f"llama_cpp is not importable here and no llama-bench is on PATH; {INSTALL_HINT}"


def _python_tool(python: str, device: str, where: str) -> PeerTool | str:
    """llama-cpp-python in `python` as a peer on `device`, or why it cannot be one."""
    probe = _python_llamacpp_probe(python)
    if isinstance(probe, str):
        return f"{where}{probe}; {INSTALL_HINT}"
    if device == "cuda" and not probe["gpu_offload"]:
        return (f"{where}llama-cpp-python {probe['version']} was built without GPU offload "
                f"(llama_supports_gpu_offload() is False); {CUDA_HINT}")
    return PeerTool("python", python, probe["version"], device)


def _python_llamacpp_probe(python: str) -> dict | str:
    """{"version", "gpu_offload"} of llama_cpp in that interpreter, or the reason it has none."""
    code = ("import json, llama_cpp; print(json.dumps({'version': llama_cpp.__version__, "
            "'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload())}))")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run it ({exc})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`import llama_cpp` fails there ({last})"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _llama_bench_tool(binary: str, device: str, where: str) -> PeerTool | str:
    """A llama-bench binary as a peer; its `--help` tells whether it takes `-dev`."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return f"{where}{binary}: not an executable file; {INSTALL_HINT}"
    try:
        done = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{where}{binary}: cannot run it ({exc}); {INSTALL_HINT}"
    return PeerTool("llama-bench", binary, None, device, takes_device_flag="--device" in done.stdout)


def run_llamacpp(tool: PeerTool, model_path: Path, model_name: str, vocab: int, cfg: RunConfig,
                 threads: int) -> Entry:
    """The peer's entry for one model: measured, or unavailable with the reason."""
    try:
        if tool.how == "python":
            return _run_python(tool, model_path, model_name, vocab, cfg, threads)
        return _run_llama_bench(tool, model_path, model_name, cfg, threads)
    except PeerFailed as exc:
        return Entry.unavailable(model_name, BACKEND_PEER[tool.device], "peer", str(exc))


def _run_python(tool: PeerTool, model_path: Path, model_name: str, vocab: int, cfg: RunConfig,
                threads: int) -> Entry:
    prompt = np.random.default_rng(cfg.seed).integers(0, vocab, cfg.n_prompt)  # same ids as ours
    req = {"model": str(model_path), "prompt": prompt.tolist(), "n_gen": cfg.n_gen, "repeats": cfg.repeats,
           "warmup": cfg.warmup, "n_threads": threads, "n_gpu_layers": PYTHON_LAYERS[tool.device]}
    env = dict(os.environ, PYTHONPATH="")  # the peer's own site-packages only
    try:
        done = subprocess.run([tool.path, str(SCRIPT)], input=json.dumps(req), stdout=subprocess.PIPE,
                              stderr=None, text=True, timeout=3600, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerFailed(f"llama.cpp run failed: {exc}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise PeerFailed(f"llama.cpp run exited {done.returncode} (its stderr is above): the model may be "
                         "one this llama.cpp cannot load")
    out = json.loads(lines[-1])
    results = [
        Result.of(f"pp{cfg.n_prompt}", "tokens/s", [cfg.n_prompt / s for s in out["pp"]]),
        Result.of(f"tg{cfg.n_gen}", "tokens/s", [cfg.n_gen / s for s in out["tg"]]),
        Result.of("ttft", "s", out["ttft"]),
        Result.of("peak_rss", "MiB", [out["peak_rss_mib"]]),
    ]
    info = {"via": "llama-cpp-python", "python": tool.path, "version": out["version"], "device": tool.device,
            "threads": out["n_threads"], "n_gpu_layers": out["n_gpu_layers"], "op_offload": out["op_offload"],
            "gpu_offload": out["gpu_offload"],
            "system_info": out["system_info"], "model_file": str(model_path)}
    return Entry(model_name, BACKEND_PEER[tool.device], "peer", True, None, results, info)


def llama_bench_command(tool: PeerTool, model_path: Path, cfg: RunConfig, threads: int) -> list[str]:
    """llama-bench's arguments: the same sizes and threads as ours, layers placed for the tool's device."""
    cmd = [tool.path, "-m", str(model_path), "-p", str(cfg.n_prompt), "-n", str(cfg.n_gen),
           "-r", str(cfg.repeats), "-t", str(threads), "-ngl", str(LLAMA_BENCH_LAYERS[tool.device])]
    if tool.device == "cpu" and tool.takes_device_flag:
        cmd += ["-dev", "none"]  # a GPU build would still send large prompt matmuls to the GPU
    return cmd + ["-o", "json"]


def _run_llama_bench(tool: PeerTool, model_path: Path, model_name: str, cfg: RunConfig, threads: int) -> Entry:
    try:
        done = subprocess.run(llama_bench_command(tool, model_path, cfg, threads), capture_output=True, text=True,
                              timeout=3600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerFailed(f"llama-bench failed: {exc}") from None
    if done.returncode != 0:
        raise PeerFailed(f"llama-bench exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_llama_bench(done.stdout, model_name, model_path, threads, tool.device, tool.path)


def parse_llama_bench(text: str, model_name: str, model_path: Path | str, threads: int, device: str = "cpu",
                      binary: str = "llama-bench") -> Entry:
    """An entry from `llama-bench -o json` output: one object per test with samples_ts or avg_ts.

    For the CUDA peer the rows must show that llama.cpp ran on a GPU (a CUDA backend,
    a GPU in gpu_info); PeerFailed says how to get such a build when they do not."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PeerFailed(f"llama-bench printed no JSON ({exc.msg}); is it older than `-o json`?") from None
    facts = _device_facts(rows)
    if device == "cuda":
        _require_cuda(facts, binary)
    results = []
    for row in rows:
        n_p, n_g = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        test = f"pp{n_p}" if n_g == 0 else f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}"
        samples = row.get("samples_ts") or [row["avg_ts"]]
        results.append(Result.of(test, "tokens/s", [float(v) for v in samples]))
    version = rows[0].get("build_commit") if rows else None
    info = {"via": "llama-bench", "binary": binary, "version": version, "device": device, "threads": threads,
            **facts, "model_file": str(model_path)}
    return Entry(model_name, BACKEND_PEER[device], "peer", True, None, results, info)


def _device_facts(rows: list[dict]) -> dict:
    """What llama-bench reported about where it ran (first row; every row shares them)."""
    first = rows[0] if rows else {}
    return {"backends": first.get("backends"), "gpu_info": first.get("gpu_info"),
            "n_gpu_layers": first.get("n_gpu_layers"), "devices": first.get("devices")}


def _require_cuda(facts: dict, binary: str) -> None:
    """PeerFailed unless llama-bench ran with its CUDA backend on a GPU."""
    backends = [b.strip() for b in str(facts["backends"] or "").split(",")]
    if "CUDA" not in backends:
        raise PeerFailed(f"{binary} has no CUDA backend (it reports backends {facts['backends']!r}), so it "
                         f"ran on the CPU; {CUDA_HINT}")
    if not facts["gpu_info"]:
        raise PeerFailed(f"{binary} is built with CUDA but found no GPU (gpu_info is empty): check the NVIDIA "
                         "driver with `nvidia-smi`")
