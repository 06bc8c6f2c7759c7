"""The GPU-machine kit: every check that needs an NVIDIA GPU, in two commands that fit a 15-minute
lease (machine start included, at most 10 minutes a command).  docs/gpu_kit.md gives the commands.

    python3 tools/dev/gpu_check.py run   -o OUT [--dry-run] [--steps a,b,..]      # < 8 min
    python3 tools/dev/gpu_check.py llama -o OUT [--archive X.tar.xz] [--llama-cpp SRC]
    python3 tools/dev/gpu_check.py pack-llamacpp SRC llama.cpp-src.tar.xz

Each step runs in its own process under its own deadline (tools/dev/kit_steps.py: killed at it and
recorded as `timeout`, then the next step runs) and is written to OUT/summary.json as it ends; its
output is OUT/<step>.log.  Only the standard library is used until `install` has made SITE
(links to this tree's packages as `ukgpu.*`, plus the carried wheels), so the machine's own Python
with its GPU stack runs everything.  `run`'s steps, deadlines in seconds (sum 460):

  env         15   nvidia-smi, Python, numpy, the driver binding, ptxas on PATH or not
  install     25   SITE/ukgpu -> this tree; pip install --no-index --no-deps the wheels in --wheels;
                   starts building the synthetic models in the background (OUT/synthetic.log)
  ptx-check   25   `ukgpu ptx check` (--no-ptxas unless ptxas is on PATH)
  tests      110   pytest tests/gpu
  verify      90   `ukgpu verify` layers + e2e on --slice (real weights), then all on synthetic SmolLM2
  ptx-bench   75   tests/perf/bench_ptx_gpu.py: kernels timed from captured-graph replays
  bench-cuda 120   tests/perf/bench_cuda.py: ukgpu alone, synthetic Qwen2.5-Coder-1.5B + SmolLM2-135M
  sweep      225   tools/dev/kernel_sweep.py run: the shipped build and its environment variants
                   (each decode path of fused_ops.py on and off), or, when build/kit/variants is
                   carried, the shipped build and the variants built there (mat-vec and GEMM
                   geometries, an older commit's kernels); pp512, tg128, 4 sequences, tg after
                   1024 tokens, greedy tokens compared (OUT/sweep); not in the default steps

`llama` runs two steps: llama-bench (240 s), the prebuilt llama-bench (from --archive; built from
--llama-cpp with CMake and nvcc if no archive is there) on the same synthetic models, its results
in OUT/llama-bench.json; then ukgpu-bench (180 s): `ukgpu bench --backends cuda --peers
llamacpp-cuda` on the same models with that binary, and its dashboard (OUT/ukgpu-bench.json, .md,
.html); both steps added to the same summary.json.  --dry-run (the stand-in driver, no GPU) shrinks
the benchmarks: bench_ptx_gpu --quick, bench_cuda --quick, ukgpu bench -p 16 -n 4 -r 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kit_steps import Step, run_steps  # noqa: E402
from llamacpp_src import CheckError, build_llama_bench, pack_llamacpp  # noqa: E402

ROOT = HERE.parents[1]
KIT = ROOT / "build" / "kit"  # ignored by git; what the device machine needs travels here
RUN_STEPS = {"env": 15, "install": 25, "ptx-check": 25, "tests": 110, "verify": 90,
             "ptx-bench": 75, "bench-cuda": 120, "sweep": 225}
OPTIONAL_STEPS = ("sweep",)  # run only when --steps names them
LLAMA_STEPS = {"llama-bench": 240, "ukgpu-bench": 180}
SYNTHETIC = ("qwen2.5-coder-1.5b", "smollm2-135m")
PACKAGES = ("llama_core", "gpu", "ptx_kernels", "kernel", "tools")  # pyproject's package-dir


class Phases:
    """The body of each step, run in the step's own process (`gpu_check.py step NAME`)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out, self.python = args, args.out.resolve(), args.python
        self.site = args.site.resolve()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if (self.site / "ukgpu").is_dir():
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.site), self.env.get("PYTHONPATH", "")) if p)

    def sh(self, cmd: list[str], check: bool = True, **env: str) -> int:
        print(f"$ {' '.join(cmd)}", flush=True)
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=dict(self.env, **env)).returncode
        except FileNotFoundError as exc:
            raise CheckError(f"{cmd[0]}: not found ({exc.strerror})") from None
        print(f"[exit {code}]", flush=True)
        if check and code != 0:
            raise CheckError(f"`{' '.join(cmd[:4])}...` exited {code} (see the log)")
        return code

    def ukgpu(self, *args: str, check: bool = True) -> int:
        return self.sh([self.python, "-m", "ukgpu.tools.cli", *args], check=check)

    def py(self, code: str) -> str:
        """The last stdout line of `python -c code` (with SITE on the path)."""
        done = subprocess.run([self.python, "-c", code], cwd=ROOT, env=self.env,
                              capture_output=True, text=True)
        sys.stdout.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise CheckError(f"python -c {code[:60]!r}... exited {done.returncode}")
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    def env_(self) -> str:
        smi = shutil.which("nvidia-smi")
        if smi:
            self.sh([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                     "--format=csv"], check=False)
        self.py("import sys, numpy; print(sys.version); print('numpy', numpy.__version__)")
        self.sh([self.python, "-c", "from cuda.bindings import driver as d; "
                 "print('cuInit', d.cuInit(0), 'driver', d.cuDriverGetVersion())"], check=False)
        return f"{'nvidia-smi' if smi else 'no nvidia-smi'}; ptxas {shutil.which('ptxas') or 'not on PATH'}"

    def install(self) -> str:
        ns = self.site / "ukgpu"
        ns.mkdir(parents=True, exist_ok=True)
        for pkg in PACKAGES:  # the namespace pyproject builds, without building a wheel
            link = ns / pkg
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(ROOT / pkg, target_is_directory=True)
        wheels = sorted(self.args.wheels.glob("*.whl")) if self.args.wheels.is_dir() else []
        if wheels:
            self.sh([self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                     "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(self.site),
                     *map(str, wheels)])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.site), self.env.get("PYTHONPATH", "")) if p)
        self.py("import ukgpu.gpu.cuda.backend, ukgpu.llama_core.model, gguf; print('ukgpu imports')")
        self.prebuild()
        return f"ukgpu linked + {len(wheels)} wheel(s) in {self.site}; synthetic models building"

    def prebuild(self) -> None:
        """Build the synthetic models in the background (the 1.5B one takes a minute or two of
        numpy), while the checks run; OUT/synthetic.done marks its end, success or not."""
        done = self.out / "synthetic.done"
        done.unlink(missing_ok=True)
        code = ("import pathlib\nfrom ukgpu.llama_core.gguf.synthetic import build_synthetic\n"
                f"try:\n    [print(build_synthetic(n), flush=True) for n in {SYNTHETIC[::-1]!r}]\n"
                f"finally:\n    pathlib.Path({str(done)!r}).touch()\n")
        with (self.out / "synthetic.log").open("w") as log:
            subprocess.Popen([self.python, "-c", code], cwd=ROOT, env=self.env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)

    def await_prebuild(self) -> None:
        """Wait for the background build `install` started (if it did), instead of racing it."""
        if not (self.out / "synthetic.log").is_file():
            return
        while not (self.out / "synthetic.done").is_file():
            time.sleep(1)

    def ptx_check(self) -> str:
        flags = [] if shutil.which("ptxas") else ["--no-ptxas"]
        self.ukgpu("ptx", "check", *flags)
        return "ptxas ran" if not flags else "--no-ptxas (no ptxas on PATH)"

    def tests(self) -> str:
        code = self.sh([self.python, "-m", "pytest", "tests/gpu", "-v", "-ra", "-p", "no:cacheprovider",
                        "--durations=15", "-o", "timeout=60",
                        f"--junitxml={self.out / 'gpu-tests.xml'}"], check=False)
        if code != 0:
            raise CheckError(f"pytest tests/gpu exited {code} (gpu-tests.xml)")
        return "pytest tests/gpu passed (gpu-tests.xml)"

    def synthetic(self, name: str) -> str:
        return self.py("from ukgpu.llama_core.gguf.synthetic import build_synthetic; "
                       f"print(build_synthetic({name!r}))")

    def verify(self) -> str:
        models = [("slice", str(self.args.slice.resolve()), ["--layers", "--e2e"])
                  ] if self.args.slice.is_file() else []  # real weights first: 2 blocks, quick
        models.append(("synthetic-smollm2-135m", self.synthetic("smollm2-135m"), []))
        failed = [name for name, path, levels in models
                  if self.ukgpu("verify", "-m", path, *levels, "--json",
                                str(self.out / f"verify-{name}.json"), check=False) != 0]
        if failed:
            raise CheckError(f"verify failed on {', '.join(failed)} (verify-*.json)")
        slice_note = "" if self.args.slice.is_file() else f"; no slice at {self.args.slice}"
        return f"passed on {', '.join(n for n, _, _ in models)}{slice_note}"

    def ptx_bench(self) -> str:
        self.sh([self.python, "tests/perf/bench_ptx_gpu.py", "--json", str(self.out / "ptx-bench.json"),
                 *(["--quick"] if self.args.dry_run else [])])
        return "ptx-bench.json (graph-timed)"

    def bench_cuda(self) -> str:
        self.await_prebuild()
        self.sh([self.python, "tests/perf/bench_cuda.py", "--json", str(self.out / "bench-cuda.json"),
                 "--repeats", "3", "--models", *SYNTHETIC[::-1],  # the small one first
                 *(["--quick"] if self.args.dry_run else [])])
        return "bench-cuda.json (ukgpu alone)"

    def sweep(self) -> str:
        """Old and new decode paths of the shipped build in one run (`kernel_sweep.py run`), or the
        variants of build/kit/variants when it holds any (then without the environment variants,
        which the first comparison command measures): pp512, tg, 4 sequences and tg after 1024
        tokens per variant, tokens against the shipped build's."""
        self.await_prebuild()
        quick = ["--repeats", "1", "--n-gen", "4", "--models", "smollm2-135m"] if self.args.dry_run else []
        built = ROOT / "build" / "kit" / "variants"  # `kernel_sweep.py build` here, carried along
        variants = ["-d", str(built), "--no-env"] if any(built.glob("*/sm_90a/manifest.json")) else []
        self.sh([self.python, "tools/dev/kernel_sweep.py", "run", "-o", str(self.out / "sweep"), *variants,
                 *quick])
        rows = json.loads((self.out / "sweep" / "sweep.json").read_text())
        failed = [r["variant"] for r in rows if r.get("exit")]
        if failed:
            raise CheckError(f"sweep variants failed: {', '.join(failed)} (sweep/sweep.json)")
        return f"sweep/sweep.json ({len(rows)} runs)"

    def _llama_ready(self) -> Path:
        """The llama-bench binary, runnable: ukgpu installed (a fresh machine: `run` did not go
        first), the Python's `nvidia/*/lib*.so.13` (cuBLAS, cudart) on LD_LIBRARY_PATH for every
        later command, the background model build finished."""
        binary = self._llama_binary()
        if not (self.site / "ukgpu").is_dir():
            self.install()
        libs = self.py("import site, pathlib; d = {str(p.parent) for s in site.getsitepackages() "
                       "for p in pathlib.Path(s, 'nvidia').rglob('lib*.so.13')}; print(':'.join(sorted(d)))")
        self.env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, self.env.get("LD_LIBRARY_PATH", "")) if p)
        self.await_prebuild()
        return binary

    def llama_bench(self) -> str:
        binary = self._llama_ready()
        for name in SYNTHETIC:
            self.synthetic(name)  # cached when `run` went first on this machine
        self.sh([self.python, "tests/perf/bench_cuda.py", "--llama-only", "--llama-bench", str(binary),
                 "--repeats", "1" if self.args.dry_run else "3", "--json",
                 str(self.out / "llama-bench.json")])
        res = json.loads((self.out / "llama-bench.json").read_text())
        errors = [f"{m}: {r['error']}" for m, v in res.items() if isinstance(v, dict)
                  for r in v.get("llama.cpp", {}).values() if "error" in r]
        if errors:
            raise CheckError(f"llama-bench failed: {'; '.join(errors)[:300]}")
        return f"llama-bench.json ({binary})"

    def ukgpu_bench(self) -> str:
        """The product's own benchmark on the card: `ukgpu bench --backends cuda --peers
        llamacpp-cuda` on the synthetic models (results JSON + the dashboard page)."""
        binary = self._llama_ready()
        sizes = ["-p", "16", "-n", "4", "-r", "1"] if self.args.dry_run else ["-r", "3"]
        models = [a for name in SYNTHETIC[::-1] for a in ("--synthetic", name)]
        out = self.out / "ukgpu-bench.json"
        code = self.ukgpu("bench", *models, "--backends", "cuda", "--peers", "llamacpp-cuda",
                          "--llama-bench", str(binary), "--no-kernels", *sizes, "-o", str(out), check=False)
        if not out.is_file():
            raise CheckError(f"ukgpu bench exited {code} and wrote no results")
        self.ukgpu("dashboard", str(out), "-o", str(self.out / "ukgpu-bench.html"),
                   "--markdown", str(self.out / "ukgpu-bench.md"))
        return f"ukgpu-bench.json, .md, .html (ukgpu bench exit {code})"

    def _llama_binary(self) -> Path:
        bin_dir = KIT / "bin"
        if self.args.archive.is_file():
            bin_dir.mkdir(parents=True, exist_ok=True)
            with tarfile.open(self.args.archive) as tar:
                tar.extractall(bin_dir, filter="data")
            return bin_dir / "llama-bench"
        if self.args.llama_cpp:
            return build_llama_bench(self.args.llama_cpp, KIT / "llama.cpp", sys.stdout)
        raise CheckError(f"no llama-bench archive at {self.args.archive} (copy "
                         "a prebuilt llama-bench-cuda-sm90a.tar.xz there) and no --llama-cpp SRC")


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-o", "--out", type=Path, required=True, help="folder for logs and summary.json")
    ap.add_argument("--python", default=sys.executable, help="interpreter with the GPU stack")
    ap.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "ukgpu-site")
    ap.add_argument("--wheels", type=Path, default=KIT / "wheels", help="wheels missing there")
    ap.add_argument("--slice", type=Path, default=KIT / "smollm2-slice.gguf",
                    help="real-weight slice (tools/dev/gguf_slice.py) for verify")
    ap.add_argument("--archive", type=Path, default=KIT / "llama-bench-cuda-sm90a.tar.xz")
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source to build if no --archive")
    ap.add_argument("--dry-run", action="store_true", help="shrunk benchmarks (the stand-in driver)")
    ap.add_argument("--steps", "--phases", dest="steps", help="comma-separated subset, in the command's order")
    ap.add_argument("--deadline-scale", type=float, default=1.0, help=argparse.SUPPRESS)


def _forward(args: argparse.Namespace) -> list[str]:
    """The options a step's own process gets again."""
    out = ["-o", str(args.out.resolve()), "--python", args.python, "--site", str(args.site),
           "--wheels", str(args.wheels), "--slice", str(args.slice), "--archive", str(args.archive)]
    out += ["--llama-cpp", str(args.llama_cpp)] if args.llama_cpp else []
    return out + (["--dry-run"] if args.dry_run else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, what in (("run", "the checks and ukgpu's benchmarks"), ("llama", "llama-bench CUDA"),
                       ("step", argparse.SUPPRESS)):
        p = sub.add_parser(name, help=what)
        if name == "step":
            p.add_argument("name", choices=[*RUN_STEPS, *LLAMA_STEPS])
        _options(p)
    pack = sub.add_parser("pack-llamacpp", help="trim a llama.cpp tree to what llama-bench needs")
    pack.add_argument("src", type=Path)
    pack.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack-llamacpp":
        try:
            files, size = pack_llamacpp(args.src, args.dst)
        except (CheckError, OSError, tarfile.TarError) as exc:
            print(f"gpu_check: {exc}", file=sys.stderr)
            return 2
        print(f"gpu_check: {args.dst}: {files} files, {size / 2**20:.1f} MiB")
        return 0
    if args.cmd == "step":
        return _step(args)
    table = RUN_STEPS if args.cmd == "run" else LLAMA_STEPS
    names = args.steps.split(",") if args.steps else [n for n in table if n not in OPTIONAL_STEPS]
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"gpu_check: unknown step(s) {', '.join(unknown)}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    me = [sys.executable, str(Path(__file__).resolve()), "step"]
    steps = [Step(n, table[n] * args.deadline_scale, [*me, n, *_forward(args)]) for n in names]
    records = run_steps(steps, args.out, args.cmd, cwd=ROOT)
    return 1 if any(r.status != "ok" for r in records) else 0


def _step(args: argparse.Namespace) -> int:
    phases = Phases(args)
    try:
        detail = getattr(phases, args.name.replace("-", "_") if args.name != "env" else "env_")()
    except CheckError as exc:
        print(f"\nFAILED: {exc}", flush=True)
        (args.out / f"{args.name}.detail").write_text(str(exc) + "\n")
        return 1
    (args.out / f"{args.name}.detail").write_text(detail + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
