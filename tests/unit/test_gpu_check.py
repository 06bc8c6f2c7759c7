"""The GPU kit without a GPU: the step runner (deadlines, summary.json kept current), the kit's
command line, and the llama.cpp source packing (the steps themselves run under the stand-in
driver in tests/integration/test_cuda_real_bindings.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "dev"))  # host-side scripts, not in the wheel
import gpu_check  # noqa: E402
import llamacpp_src  # noqa: E402
from kit_steps import Step, run_steps  # noqa: E402


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
    files, size = llamacpp_src.pack_llamacpp(sdist, out)
    with tarfile.open(out) as tar:
        names = sorted(m.name.removeprefix("llama.cpp/") for m in tar.getmembers())
    assert names == sorted(["CMakeLists.txt", "ggml/CMakeLists.txt", "ggml/src/ggml.c",
                            "ggml/src/ggml-version.h.in", "ggml/src/ggml-cuda/mmq.cu",
                            "ggml/src/ggml-cpu/ops.cpp", "src/llama.cpp", "common/common.cpp",
                            "tools/llama-bench/llama-bench.cpp", "vendor/nlohmann/json.hpp", "LICENSE"])
    assert files == len(names) and size == out.stat().st_size
    # a pack unpacks to a tree the runner finds again
    assert llamacpp_src.unpack(out, tmp_path / "again") == tmp_path / "again" / "llama.cpp"
    assert llamacpp_src.find_llamacpp_root(src) == src


def test_a_folder_without_llama_cpp_is_a_clear_error(tmp_path):
    _tree(tmp_path / "x", ["README.md", "a/b.txt"])
    with pytest.raises(llamacpp_src.CheckError, match="holds no llama.cpp tree"):
        llamacpp_src.find_llamacpp_root(tmp_path / "x")
    with pytest.raises(llamacpp_src.CheckError, match="no such file"):
        llamacpp_src.unpack(tmp_path / "missing.tar.gz", tmp_path / "y")


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_step_past_its_deadline_is_killed_with_its_children_and_the_next_one_runs(tmp_path):
    out = tmp_path / "out"
    sleeper = ("import subprocess, sys, time; "
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(p.pid)); print('started', flush=True); "
               "time.sleep(60)")
    t0 = time.monotonic()
    records = run_steps([Step("slow", 1.5, _py(sleeper)), Step("next", 30, _py("print('ran')"))],
                        out, "run", cwd=tmp_path)
    assert time.monotonic() - t0 < 20
    assert [(r.step, r.status) for r in records] == [("slow", "timeout"), ("next", "ok")]
    assert records[0].exit is None and 1.5 <= records[0].seconds < 10
    assert records[0].detail.startswith("killed at its 1.5 s deadline")
    assert "started" in (out / "slow.log").read_text() and records[1].detail == "ran"
    assert records[0].detail.endswith("last output: started")
    child = Path(f"/proc/{int((tmp_path / 'child.pid').read_text())}/stat")
    time.sleep(0.2)  # the step's own children went with it (gone, or a zombie nobody waited for)
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_the_summary_lists_every_step_and_is_written_as_each_one_ends(tmp_path):
    out = tmp_path / "out"
    peek = ("import json, pathlib; s = json.loads(pathlib.Path('out/summary.json').read_text()); "
            "pathlib.Path('out/peek.detail').write_text(' '.join(r['step'] + '=' + r['status'] "
            "for r in s['steps']))")
    records = run_steps([Step("first", 30, _py("import sys; sys.exit(3)")),
                         Step("peek", 30, _py(peek)), Step("last", 30, _py("pass"))],
                        out, "run", cwd=tmp_path)
    # while `peek` ran, `first` was already recorded and `last` listed as pending
    assert records[1].detail == "first=failed peek=pending last=pending"
    assert records[0].exit == 3 and records[0].status == "failed"
    run_steps([Step("llama-bench", 30, _py("print('second command')"))], out, "llama", cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())["steps"]
    assert [(r["step"], r["command"], r["status"]) for r in summary] == [
        ("first", "run", "failed"), ("peek", "run", "ok"), ("last", "run", "ok"),
        ("llama-bench", "llama", "ok")]
    assert all(r["deadline_s"] == 30 for r in summary)


def test_the_run_deadlines_fit_the_8_minute_first_command():
    default = {n: s for n, s in gpu_check.RUN_STEPS.items() if n not in gpu_check.OPTIONAL_STEPS}
    assert sum(default.values()) < 8 * 60
    assert list(default) == ["env", "install", "ptx-check", "tests", "verify", "ptx-bench", "bench-cuda"]
    # the decode-path comparison: install, tests, verify and the sweep within ~7 minutes
    assert sum(gpu_check.RUN_STEPS[n] for n in ("install", "tests", "verify", "sweep")) <= 7.5 * 60
    assert sum(gpu_check.LLAMA_STEPS.values()) < 10 * 60


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "dev" / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_llama_without_an_archive_says_so_in_the_summary(tmp_path):
    out = tmp_path / "out"
    done = _run(tmp_path, "llama", "-o", str(out), "--archive", str(tmp_path / "none.tar.xz"))
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())["steps"]
    assert [(r["step"], r["status"]) for r in summary] == [("llama-bench", "failed"), ("ukgpu-bench", "failed")]
    assert all(f"no llama-bench archive at {tmp_path / 'none.tar.xz'}" in r["detail"] for r in summary)
    assert "FAILED" in (out / "llama-bench.log").read_text()


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    done = _run(tmp_path, "run", "-o", str(tmp_path / "out"), "--steps", "tests,warp-drive")
    assert done.returncode == 2 and "warp-drive" in done.stderr
    assert not (tmp_path / "out").exists()
