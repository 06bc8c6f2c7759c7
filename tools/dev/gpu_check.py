"""Every check that needs an NVIDIA GPU, in one command, on a machine that may have no network.

    python3 tools/dev/gpu_check.py run -o results/ [--wheels DIR] [--llama-cpp SRC] [--phases a,b,...]
    python3 tools/dev/gpu_check.py pack-llamacpp SRC llama.cpp-src.tar.xz

`run` goes through the phases below in order, each logged to OUT/<phase>.log, timed and
recorded in OUT/summary.json (and printed as a table); a failing phase does not stop the next
ones, and the exit status is 1 when any failed.  It uses only the standard library until the
`install` phase has put ukgpu (and any carried wheels) into a private folder on PYTHONPATH, so
the target machine needs a Python with the GPU stack (cuda-python, numpy, numba), not a
virtualenv of ours.

  env         nvidia-smi, the Python and the driver binding versions, `ukgpu pci`
  install     pip install --no-index --no-deps --target SITE: ukgpu and the wheels in --wheels
  ptx-check   `ukgpu ptx check` (artifacts fresh; ptxas accepts every kernel)
  tests       pytest tests/gpu (kernels through the backend, models vs the CPU, graph decode, verify)
  verify      `ukgpu verify` (kernels, layers, end to end) on synthetic SmolLM2-135M and on every
              cached real model
  ptx-bench   tests/perf/bench_ptx_gpu.py: copy bandwidth, mat-vec GB/s, GEMM TFLOP/s, attention
  llamacpp    build llama.cpp's llama-bench with CUDA for this GPU from --llama-cpp (a source tree,
              a llama-cpp-python sdist, or a tarball made by `pack-llamacpp`)
  bench-cuda  tests/perf/bench_cuda.py: pp512/tg128 on synthetic Qwen2.5-Coder-1.5B Q4_K_M and
              SmolLM2-135M shapes, ukgpu vs llama-bench (flash attention on and off)
  bench       `ukgpu bench` on the same synthetic shapes (cpu and cuda backends, llama.cpp peers)
              and `ukgpu dashboard` of it

`pack-llamacpp` trims a llama.cpp tree (or the one vendored in a llama-cpp-python sdist) to what
building llama-bench needs and writes it as .tar.xz, small enough to carry to an offline machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("env", "install", "ptx-check", "tests", "verify", "ptx-bench", "llamacpp", "bench-cuda",
          "bench")
SYNTHETIC = ("qwen2.5-coder-1.5b", "smollm2-135m")

# Parts of a llama.cpp tree that building llama-bench never reads (with tests, examples and the
# server off); the ggml backends other than the CPU and CUDA ones are only added when enabled.
PACK_SKIP_DIRS = {"models", "docs", "media", "examples", "tests", "gguf-py", "pocs", "benches",
                  "ci", "scripts", "conversion", "grammars", "requirements",
                  ".git", ".github", ".devops", "tools/ui", "tools/server/public",
                  "tools/server/webui"}
PACK_KEEP_GGML = {"ggml-cpu", "ggml-cuda", "ggml-blas"}


class CheckError(Exception):
    """A phase cannot run (a missing input or tool); its message says what to do."""


@dataclass
class PhaseResult:
    phase: str
    status: str  # "ok" | "failed" | "skipped"
    seconds: float
    detail: str = ""


# --- llama.cpp sources --------------------------------------------------------------------
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


# --- running phases -----------------------------------------------------------------------
class Runner:
    def __init__(self, out: Path, python: str, site: Path, wheels: Path | None,
                 llama_cpp: Path | None, build_dir: Path, jobs: int):
        self.out, self.python, self.site = out, python, site
        self.wheels, self.llama_cpp, self.build_dir, self.jobs = wheels, llama_cpp, build_dir, jobs
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.llama_bench: Path | None = None
        self.results: list[PhaseResult] = []

    def sh(self, log, cmd: list[str], cwd: Path = ROOT, check: bool = True,
           timeout: int = 3600) -> int:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        try:
            done = subprocess.run(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except FileNotFoundError as exc:
            raise CheckError(f"{cmd[0]}: not found ({exc.strerror})") from None
        except subprocess.TimeoutExpired:
            raise CheckError(f"{shlex.join(cmd)}: still running after {timeout} s") from None
        log.write(f"[exit {done.returncode}]\n")
        if check and done.returncode != 0:
            raise CheckError(f"`{shlex.join(cmd[:4])}...` exited {done.returncode} (see the log)")
        return done.returncode

    def use_site(self) -> None:
        """Put the private install folder first on the phases' PYTHONPATH."""
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.site), self.env.get("PYTHONPATH", "")) if p)

    def ukgpu(self, log, *args: str, check: bool = True) -> int:
        return self.sh(log, [self.python, "-m", "ukgpu.tools.cli", *args], check=check)

    def run(self, phases: list[str]) -> list[PhaseResult]:
        for phase in phases:
            log_path = self.out / f"{phase}.log"
            t0 = time.monotonic()
            with log_path.open("w") as log:
                try:
                    detail = getattr(self, "phase_" + phase.replace("-", "_"))(log) or ""
                    status = "ok"
                except CheckError as exc:
                    status, detail = "failed", str(exc)
                    log.write(f"\nFAILED: {exc}\n")
            self.results.append(PhaseResult(phase, status, round(time.monotonic() - t0, 1), detail))
            print(f"gpu_check: {phase:<10} {status:<7} {self.results[-1].seconds:7.1f} s  {detail}",
                  flush=True)
        return self.results

    # --- phases -------------------------------------------------------------------------
    def phase_env(self, log) -> str:
        smi = shutil.which("nvidia-smi")
        if smi:
            self.sh(log, [smi, "--query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm",
                          "--format=csv"], check=False)
        else:
            log.write("nvidia-smi: not on PATH\n")
        self.sh(log, [self.python, "-c", "import sys, numpy; print(sys.version); print('numpy', numpy.__version__)"])
        self.sh(log, [self.python, "-m", "pip", "list"], check=False)
        self.sh(log, [self.python, "-c", "from cuda.bindings import driver as d; "
                      "print('cuInit', d.cuInit(0)); print('driver', d.cuDriverGetVersion())"], check=False)
        return "nvidia-smi found" if smi else "no nvidia-smi"

    def phase_install(self, log) -> str:
        wheels = sorted(self.wheels.glob("*.whl")) if self.wheels else []
        with tempfile.TemporaryDirectory() as tmp:  # a clean copy: pip builds in the source tree
            src = Path(tmp) / "ukgpu"
            shutil.copytree(ROOT, src, ignore=_top_level(".git", ".venv", "build", "ukgpu.egg-info",
                                                         ".pytest_cache", ".hypothesis", "out", ".whl"))
            self.sh(log, [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                          "--no-build-isolation", "--no-compile", "--upgrade", "--target",
                          str(self.site), str(src), *map(str, wheels)])
        self.use_site()
        self.sh(log, [self.python, "-c", "import ukgpu.gpu.cuda.backend, ukgpu.llama_core.model, gguf; "
                      "print('ukgpu imports')"])
        self.ukgpu(log, "pci", check=False)
        return f"ukgpu + {len(wheels)} wheel(s) in {self.site}"

    def phase_ptx_check(self, log) -> str:
        self.ukgpu(log, "ptx", "check")
        return ""

    def phase_tests(self, log) -> str:
        xml = self.out / "gpu-tests.xml"
        code = self.sh(log, [self.python, "-m", "pytest", "tests/gpu", "-q", "-ra", "-p",
                             "no:cacheprovider", f"--junitxml={xml}"], check=False)
        tail = [ln for ln in (self.out / "tests.log").read_text().splitlines() if " passed" in ln
                or " failed" in ln or " skipped" in ln]
        if code != 0:
            raise CheckError(f"pytest tests/gpu exited {code}: {tail[-1] if tail else 'see the log'}")
        return tail[-1].strip("= ") if tail else ""

    def _synthetic(self, log, name: str) -> str:
        code = ("from ukgpu.llama_core.gguf.synthetic import build_synthetic; "
                f"print(build_synthetic({name!r}))")
        out = subprocess.run([self.python, "-c", code], cwd=ROOT, env=self.env, capture_output=True,
                             text=True)
        log.write(out.stderr)
        if out.returncode != 0:
            raise CheckError(f"cannot write the synthetic {name} model (see the log)")
        return out.stdout.strip().splitlines()[-1]

    def phase_verify(self, log) -> str:
        models = [("synthetic-smollm2-135m", self._synthetic(log, "smollm2-135m"))]
        cached = subprocess.run([self.python, "-c", "from ukgpu.llama_core.models import registry as r; "
                                 "[print(n, r.model_path(n)) for n in ('smollm2-135m', "
                                 "'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b') if r.is_cached(n)]"],
                                cwd=ROOT, env=self.env, capture_output=True, text=True)
        models += [tuple(line.split(" ", 1)) for line in cached.stdout.splitlines()]
        failed = [name for name, path in models
                  if self.ukgpu(log, "verify", "-m", path, "--json", str(self.out / f"verify-{name}.json"),
                                check=False) != 0]
        if failed:
            raise CheckError(f"verify failed on {', '.join(failed)} (see verify-*.json)")
        return f"passed on {', '.join(n for n, _ in models)}"

    def phase_ptx_bench(self, log) -> str:
        self.sh(log, [self.python, "tests/perf/bench_ptx_gpu.py", "--json", str(self.out / "ptx-bench.json")])
        return "ptx-bench.json"

    def phase_llamacpp(self, log) -> str:
        if self.llama_cpp is None:
            raise CheckError("no --llama-cpp SRC given (a llama.cpp tree, a llama-cpp-python sdist or a "
                             "`pack-llamacpp` tarball)")
        for tool in ("cmake", "nvcc"):
            if not shutil.which(tool):
                raise CheckError(f"{tool} is not on PATH: llama-bench with CUDA needs the CUDA toolkit and CMake")
        src = unpack(self.llama_cpp, self.build_dir / "src")
        arch = cuda_arch(log)
        build = self.build_dir / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        self.sh(log, ["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                      "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_NATIVE=ON",
                      "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                      "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"], cwd=self.build_dir)
        self.sh(log, ["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(self.jobs)],
                cwd=self.build_dir)
        found = sorted(build.rglob("llama-bench"))
        if not found:
            raise CheckError(f"the build finished but no llama-bench binary is under {build}")
        self.llama_bench = found[0]
        return f"{self.llama_bench} (CUDA arch {arch})"

    def _need_llama_bench(self) -> Path | None:
        if self.llama_bench is None:
            cached = sorted((self.build_dir / "build").rglob("llama-bench"))
            self.llama_bench = cached[0] if cached else None
        return self.llama_bench

    def phase_bench_cuda(self, log) -> str:
        cmd = [self.python, "tests/perf/bench_cuda.py", "--json", str(self.out / "bench-cuda.json")]
        lb = self._need_llama_bench()
        self.sh(log, cmd + (["--llama-bench", str(lb)] if lb else []))
        return "bench-cuda.json" + ("" if lb else " (no llama-bench: ukgpu only)")

    def phase_bench(self, log) -> str:
        lb = self._need_llama_bench()
        out = self.out / "bench.json"
        self.ukgpu(log, "bench", *[a for s in SYNTHETIC for a in ("--synthetic", s)],
                   "--backends", "cpu,cuda", "--peers", "llamacpp,llamacpp-cuda",
                   *(["--llama-bench", str(lb)] if lb else []), "-o", str(out))
        self.ukgpu(log, "dashboard", str(out), "-o", str(self.out / "report.html"))
        return "bench.json, report.html"


def _top_level(*names: str):
    """copytree ignore: these names directly under the root only (ptx_kernels/build stays)."""
    def ignore(folder: str, entries: list[str]) -> list[str]:
        return [e for e in entries if e in names] if Path(folder) == ROOT else []
    return ignore


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


def _print_summary(results: list[PhaseResult]) -> None:
    print("\nphase       status   seconds  detail")
    for r in results:
        print(f"{r.phase:<11} {r.status:<8} {r.seconds:7.1f}  {r.detail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the GPU checks and benchmarks")
    run.add_argument("-o", "--out", type=Path, required=True, help="folder for logs and results")
    run.add_argument("--phases", default=",".join(PHASES),
                     help=f"comma-separated, in this order: {','.join(PHASES)} (default: all)")
    run.add_argument("--wheels", type=Path, help="folder of wheels to install (packages missing here)")
    run.add_argument("--llama-cpp", type=Path, help="llama.cpp source: tree, sdist or pack-llamacpp tarball")
    run.add_argument("--python", default=sys.executable, help="interpreter with the GPU stack")
    run.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "ukgpu-site")
    run.add_argument("--build-dir", type=Path, default=Path(tempfile.gettempdir()) / "ukgpu-llamacpp")
    run.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    pack = sub.add_parser("pack-llamacpp", help="trim a llama.cpp tree to what llama-bench needs")
    pack.add_argument("src", type=Path)
    pack.add_argument("out", type=Path)
    args = ap.parse_args(argv)

    if args.cmd == "pack-llamacpp":
        try:
            files, size = pack_llamacpp(args.src, args.out)
        except (CheckError, OSError, tarfile.TarError) as exc:
            print(f"gpu_check: {exc}", file=sys.stderr)
            return 2
        print(f"gpu_check: {args.out}: {files} files, {size / 2**20:.1f} MiB")
        return 0

    phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        print(f"gpu_check: unknown phase(s) {', '.join(unknown)}; known: {', '.join(PHASES)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.build_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out.resolve(), args.python, args.site, args.wheels, args.llama_cpp,
                    args.build_dir.resolve(), args.jobs)
    if "install" not in phases and (args.site / "ukgpu").is_dir():
        runner.use_site()  # installed by an earlier run
    results = runner.run(phases)
    (args.out / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    _print_summary(results)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
