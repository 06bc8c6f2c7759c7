"""Peer implementations measured beside ukgpu: llama.cpp.

Two ways to reach llama.cpp, tried in this order:
  1. llama-cpp-python in some interpreter: `--peer-python PY`, else this
     interpreter when `import llama_cpp` works.  The measurement runs in that
     interpreter as a subprocess (`peer_llamacpp.py`), so llama.cpp may live in
     a separate virtualenv.  Install it with `pip install llama-cpp-python==0.3.36`
     (it compiles llama.cpp: ~12 minutes on 2 cores).
  2. a `llama-bench` binary on PATH (built with llama.cpp), run with `-o json`.
A peer that is not reachable becomes an unavailable entry that says how to get it.
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

from .backend_run import RunConfig
from .schema import Entry, Result

SCRIPT = Path(__file__).with_name("peer_llamacpp.py")
INSTALL_HINT = ("install llama-cpp-python (`pip install llama-cpp-python==0.3.36`, ~12 min build) and pass "
                "--peer-python PYTHON for a separate virtualenv, or put a `llama-bench` binary on PATH")


@dataclass(frozen=True)
class PeerTool:
    how: str  # "python" or "llama-bench"
    path: str  # interpreter or binary
    version: str | None


def find_llamacpp(peer_python: str | None) -> PeerTool | str:
    """The way to run llama.cpp here, or the reason there is none."""
    if peer_python:
        version = _python_llamacpp_version(peer_python)
        if version.startswith("!"):
            return f"--peer-python {peer_python}: {version[1:]}; {INSTALL_HINT}"
        return PeerTool("python", peer_python, version)
    if importlib.util.find_spec("llama_cpp") is not None:
        version = _python_llamacpp_version(sys.executable)
        if not version.startswith("!"):
            return PeerTool("python", sys.executable, version)
    binary = shutil.which("llama-bench")
    if binary:
        return PeerTool("llama-bench", binary, None)
    return f"llama_cpp is not importable here and no llama-bench is on PATH; {INSTALL_HINT}"


def _python_llamacpp_version(python: str) -> str:
    """llama_cpp's version in that interpreter, or "!reason"."""
    try:
        done = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"!cannot run it ({exc})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"!`import llama_cpp` fails there ({last})"
    return done.stdout.strip()


def run_llamacpp(tool: PeerTool, model_path: Path, model_name: str, vocab: int, cfg: RunConfig,
                 threads: int) -> Entry:
    try:
        if tool.how == "python":
            return _run_python(tool, model_path, model_name, vocab, cfg, threads)
        return _run_llama_bench(tool, model_path, model_name, cfg, threads)
    except PeerFailed as exc:
        return Entry.unavailable(model_name, "llamacpp", "peer", str(exc))


class PeerFailed(Exception):
    pass


def _run_python(tool: PeerTool, model_path: Path, model_name: str, vocab: int, cfg: RunConfig,
                threads: int) -> Entry:
    prompt = np.random.default_rng(cfg.seed).integers(0, vocab, cfg.n_prompt)  # same ids as ours
    req = {"model": str(model_path), "prompt": prompt.tolist(), "n_gen": cfg.n_gen, "repeats": cfg.repeats,
           "warmup": cfg.warmup, "n_threads": threads}
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
    info = {"via": "llama-cpp-python", "python": tool.path, "version": out["version"],
            "threads": out["n_threads"], "model_file": str(model_path)}
    return Entry(model_name, "llamacpp", "peer", True, None, results, info)


def _run_llama_bench(tool: PeerTool, model_path: Path, model_name: str, cfg: RunConfig, threads: int) -> Entry:
    cmd = [tool.path, "-m", str(model_path), "-p", str(cfg.n_prompt), "-n", str(cfg.n_gen),
           "-r", str(cfg.repeats), "-t", str(threads), "-o", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerFailed(f"llama-bench failed: {exc}") from None
    if done.returncode != 0:
        raise PeerFailed(f"llama-bench exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_llama_bench(done.stdout, model_name, model_path, threads)


def parse_llama_bench(text: str, model_name: str, model_path: Path | str, threads: int) -> Entry:
    """An entry from `llama-bench -o json` output: one object per test with samples_ts or avg_ts."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PeerFailed(f"llama-bench printed no JSON ({exc.msg}); is it older than `-o json`?") from None
    results = []
    for row in rows:
        n_p, n_g = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        test = f"pp{n_p}" if n_g == 0 else f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}"
        samples = row.get("samples_ts") or [row["avg_ts"]]
        results.append(Result.of(test, "tokens/s", [float(v) for v in samples]))
    version = rows[0].get("build_commit") if rows else None
    info = {"via": "llama-bench", "version": version, "threads": threads, "model_file": str(model_path)}
    return Entry(model_name, "llamacpp", "peer", True, None, results, info)
