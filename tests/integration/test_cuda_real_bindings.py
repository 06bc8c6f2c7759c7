"""The GPU code through cuda-python's real bindings, on a machine without a GPU.

The stand-in libcuda.so.1 (tests/cuda_stub: C, compiled here with the system compiler) answers
the bindings' cuGetProcAddress lookups with the C ABI of each entry point and forwards the raw
arguments to the fake device of tests/fakes/cuda_driver.py.  So the bindings' own argument conversion
runs for real: CUdeviceptr/CUstream/CUgraph handles, host buffers, `(values, types)` kernel
parameter packing, JIT option arrays with a writable log buffer, output pointers.  What stays
unverified is below the C ABI: the real driver, the PTX on a GPU, f16 numerics, speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "tests" / "cuda_stub"
sys.path.insert(0, str(STUB))

from libcuda_stub import build  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stub_env(tmp_path_factory):
    lib_dir = tmp_path_factory.mktemp("libcuda")
    build(lib_dir)
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib_dir), UKGPU_CUDA_STUB=str(lib_dir),
               PYTHONUNBUFFERED="1")
    return env


def _ukgpu(env: dict, *args: str, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STUB / "run.py"), *args], cwd=ROOT,
                          env=dict(env, **extra), capture_output=True, text=True, timeout=timeout)


def _calls(stderr: str) -> dict[str, int]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("libcuda stub:") and "calls" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(cu\w+)=(\d+)", line)}


def test_the_bindings_load_the_stub_and_nothing_else(stub_env):
    """The bindings resolve their entry points from the stub: a real cuInit round trip."""
    code = ("import sys; sys.path.insert(0, 'tests/cuda_stub'); from libcuda_stub import install; "
            "install(); from cuda.bindings import driver as d; "
            "print(int(d.cuInit(0)[0]), d.cuDriverGetVersion()[1], d.cuDeviceGetCount()[1]); "
            "print(*sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libcuda' in l}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=stub_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results, libs = out.stdout.splitlines()
    assert results.split() == ["0", "13000", "1"]
    assert libs.split() == [str(Path(stub_env["UKGPU_CUDA_STUB"]) / "libcuda.so.1")]


@pytest.mark.slow
def test_gpu_check_installs_and_passes_the_gpu_suite_through_the_real_bindings(stub_env, tmp_path):
    """tools/dev/gpu_check.py as on a GPU machine: ukgpu installed into a private folder, the kernels
    checked with ptxas, then tests/gpu unchanged against the stub (only the hardware timing test
    may skip)."""
    env = dict(stub_env, PYTHONPATH=str(STUB))  # sitecustomize: every process uses the stub
    out, site = tmp_path / "out", tmp_path / "site"
    done = subprocess.run([sys.executable, "tools/dev/gpu_check.py", "run", "-o", str(out),
                           "--site", str(site), "--steps", "install,ptx-check,tests",
                           "--deadline-scale", "20"],  # the stand-in is far slower than a GPU
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3500)
    log = (out / "tests.log").read_text()
    assert done.returncode == 0, done.stdout + log[-3000:]
    summary = json.loads((out / "summary.json").read_text())["steps"]
    assert [(r["step"], r["status"]) for r in summary] == [
        ("install", "ok"), ("ptx-check", "ok"), ("tests", "ok")]
    assert (site / "ukgpu" / "ptx_kernels" / "build" / "sm_90a" / "manifest.json").is_file()
    passed = int(re.search(r"(\d+) passed", log)[1])
    assert passed >= 100, log[-2000:]
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", log, re.M)
    assert all("measures GPU hardware" in s for s in skips), skips


@pytest.mark.slow
def test_verify_passes_and_decodes_through_a_captured_graph(stub_env, smollm2_path, tmp_path):
    report_path = tmp_path / "verify.json"
    out = _ukgpu(stub_env, "verify", "-m", str(smollm2_path), "--json", str(report_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["status"] == "pass"
    levels = {c["level"] for c in report["checks"]}
    assert {"kernel", "layer", "e2e"} <= levels, levels
    calls = _calls(out.stderr)
    # cubins (exact arch) and the PTX JIT path (forced by verify) both went through the bindings
    assert calls["cuModuleLoadData"] > 0 and calls["cuModuleLoadDataEx"] > 0
    # three graphs: the greedy continuation's, then the PDL comparison's (PDL on, then plain)
    assert calls["cuStreamBeginCapture"] == calls["cuStreamEndCapture"] == 3
    assert calls["cuGraphLaunch"] >= 8 and calls["cuLaunchKernelEx"] > 0
    pdl = [c for c in report["checks"] if c["name"].startswith("graph decode with PDL")]
    assert len(pdl) == 1 and pdl[0]["ok"] and pdl[0]["detail"] == "every logit equal"


def _generate(env: dict, backend: str, **extra: str) -> subprocess.CompletedProcess:
    return _ukgpu(env, "generate", "-m", "smollm2-135m", "-p", "The capital of France is",
                  "-n", "12", "--temp", "0", "--backend", backend, **extra)


@pytest.mark.slow
def test_generate_on_cuda_matches_cpu_and_injected_failures_are_reported(stub_env):
    cpu = _generate(stub_env, "cpu")
    assert cpu.returncode == 0, cpu.stderr
    cuda = _generate(stub_env, "cuda")
    assert cuda.returncode == 0, cuda.stderr[-3000:]
    assert "backend: cuda" in cuda.stderr and "libcuda stub" in cuda.stderr
    assert cuda.stdout == cpu.stdout
    assert _calls(cuda.stderr)["cuGraphLaunch"] >= 8
    # sm_90: the kernels go through cuLaunchKernelEx with the PDL attribute (the stub's C reads
    # the CUlaunchConfig the bindings marshal); a driver refusing it costs a line, not the answer
    assert _calls(cuda.stderr)["cuLaunchKernelEx"] > 0 and "dependent launch off" not in cuda.stderr
    no_pdl = _generate(stub_env, "cuda", UKGPU_CUDA_STUB_FAIL="cuLaunchKernelEx=CUDA_ERROR_NOT_SUPPORTED")
    assert no_pdl.returncode == 0, no_pdl.stderr[-3000:]
    assert no_pdl.stderr.count("programmatic dependent launch off (cuLaunchKernelEx refused") == 1
    assert no_pdl.stdout == cpu.stdout and _calls(no_pdl.stderr)["cuGraphLaunch"] >= 8

    # a cubin the driver refuses: its PTX is JIT-compiled instead, once said
    jitted = _generate(stub_env, "cuda", UKGPU_CUDA_STUB_FAIL="cuModuleLoadData=CUDA_ERROR_NO_BINARY_FOR_GPU")
    assert jitted.returncode == 0, jitted.stderr[-3000:]
    assert jitted.stderr.count("the driver refused sm_90a cubin (CUDA_ERROR_NO_BINARY_FOR_GPU)") == 1
    assert jitted.stdout == cpu.stdout and _calls(jitted.stderr)["cuModuleLoadDataEx"] > 0

    # no image the driver takes at all: auto says why and answers from the CPU
    bad = _generate(stub_env, "auto", UKGPU_CUDA_STUB_FAIL="cuModuleLoadData=CUDA_ERROR_INVALID_IMAGE,"
                                                          "cuModuleLoadDataEx=CUDA_ERROR_INVALID_PTX")
    assert bad.returncode == 0, bad.stderr
    assert "backend: cpu (CUDA unavailable: cuModuleLoadDataEx failed: CUDA_ERROR_INVALID_PTX" \
        in bad.stderr and "refused before it: sm_90a cubin: CUDA_ERROR_INVALID_IMAGE" in bad.stderr
    assert bad.stdout == cpu.stdout

    # a kernel failing mid-decode loses the context (every later call fails, as on hardware):
    # auto moves to the CPU and still gives the CPU's tokens; cuda reports it
    lost = "cuGraphLaunch=CUDA_ERROR_LAUNCH_FAILED@4"
    moved = _generate(stub_env, "auto", UKGPU_CUDA_STUB_FAIL=lost)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "cuda failed while running (cuGraphLaunch failed: CUDA_ERROR_LAUNCH_FAILED" in moved.stderr
    assert "continuing on the CPU" in moved.stderr
    assert moved.stdout == cpu.stdout
    assert "Traceback" not in moved.stderr and "Exception ignored" not in moved.stderr
    failed = _generate(stub_env, "cuda", UKGPU_CUDA_STUB_FAIL=lost)
    assert failed.returncode == 1
    assert "ukgpu: error: cuGraphLaunch failed: CUDA_ERROR_LAUNCH_FAILED" in failed.stderr
    assert "Traceback" not in failed.stderr and "Exception ignored" not in failed.stderr

    # the PTX JIT path (an sm_80 device has no cubin): the JIT log written by the driver
    # through the bindings' option array reaches the user's error message
    jit = _generate(stub_env, "cuda", UKGPU_CUDA_STUB_CC="8.0",
                    UKGPU_CUDA_STUB_FAIL="cuModuleLoadDataEx=CUDA_ERROR_INVALID_PTX")
    assert jit.returncode == 1
    assert "CUDA_ERROR_INVALID_PTX" in jit.stderr
    assert "JIT log: ptxas fatal (fake driver): injected failure" in jit.stderr
    assert "Traceback" not in jit.stderr


def test_no_device_and_pre_ampere_devices_are_refused_with_a_reason(stub_env):
    none = _ukgpu(stub_env, "verify", "--kernels", UKGPU_CUDA_STUB_DEVICES="0")
    assert none.returncode == 2, none.stdout + none.stderr
    assert "CUDA_ERROR_NO_DEVICE" in none.stdout + none.stderr
    old = _ukgpu(stub_env, "verify", "--kernels", UKGPU_CUDA_STUB_CC="7.5")
    assert old.returncode == 2, old.stdout + old.stderr
    assert "sm_75" in old.stdout + old.stderr and "sm_80" in old.stdout + old.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend, failure", [("cuda", None),
                                              ("auto", "cuGraphLaunch=CUDA_ERROR_LAUNCH_FAILED@6")],
                         ids=["cuda", "auto-device-lost-mid-run"])
def test_server_on_cuda_answers_like_the_cpu_from_its_scheduler_thread(stub_env, smollm2_path,
                                                                       backend, failure):
    """`ukgpu serve --backend cuda`: the scheduler thread, not the one that opened the device,
    drives the GPU (the context is made current there); two slots answer concurrently, streamed
    and not, with the CPU engine's greedy text.  With --backend auto, a device lost in the
    middle of the requests moves the server to the CPU: every answer is still the CPU's."""
    import signal
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import openai

    from ukgpu.kernel.api import ApiLimits, create_app
    from ukgpu.kernel.api.server import background
    from ukgpu.llama_core.engine import Engine

    prompts = ["The capital of France is", "def fibonacci(n):"]

    def plain(client, prompt):
        return client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                         max_tokens=10, temperature=0).choices[0].text

    def streamed(client, prompt):
        chunks = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                           max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    engine = Engine.load(smollm2_path, backend="cpu", n_ctx=256)
    with background(create_app(engine, ApiLimits(), model_id="smollm2-135m")) as cpu_url:
        cpu_client = openai.OpenAI(base_url=cpu_url + "/v1", api_key="none", timeout=300)
        want = [plain(cpu_client, p) for p in prompts]
    assert want[0].strip() and want[1].strip()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(STUB / "run.py"), "serve", "-m", str(smollm2_path),
                             "--port", str(port), "--slots", "2", "--ctx", "256", "--backend", backend],
                            cwd=ROOT, env=dict(stub_env, UKGPU_CUDA_STUB_FAIL=failure or ""), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server never got ready"
            try:
                if httpx.get(url + "/health").json()["status"] == "ready":
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=300)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda job: job[0](client, job[1]),
                                [(plain, prompts[0]), (streamed, prompts[1]),
                                 (streamed, prompts[0]), (plain, prompts[1])]))
        assert got == [want[0], want[1], want[0], want[1]]
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ready"
        assert health["backend"] == ("cpu" if failure else "cuda"), health
        assert ("continuing on the CPU" in health["backend_note"]) == bool(failure), health
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, 130), output[-3000:]
    assert "backend: cuda" in output, output[-3000:]
    assert "error(s) inside the stub" not in output and "Traceback" not in output, output[-3000:]
    assert _calls(output)["cuGraphLaunch"] > 0
    assert ("continuing on the CPU" in output) == (failure is not None), output[-3000:]
