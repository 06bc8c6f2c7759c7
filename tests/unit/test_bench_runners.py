"""Peer discovery and parsing (llama.cpp on the CPU and on the GPU, through fake llama-bench and
llama-cpp-python executables), backend availability, the dashboard's backend/peer pairing, and
one real `ukgpu bench` run."""

import json
import re
import sys
from pathlib import Path

import pytest

from ukgpu.tools.bench import backend_run, html, peers
from ukgpu.tools.bench.backend_run import RunConfig
from ukgpu.tools.bench.runner import BenchRequest, _find_peer
from ukgpu.tools.bench.schema import Entry, Report, Result, load_report
from ukgpu.tools.cli import main

LLAMA_BENCH_JSON = json.dumps([
    {"build_commit": "1a2b3c4", "model_filename": "m.gguf", "n_prompt": 128, "n_gen": 0, "n_threads": 2,
     "avg_ts": 300.0, "stddev_ts": 10.0, "samples_ts": [290.0, 300.0, 310.0]},
    {"build_commit": "1a2b3c4", "model_filename": "m.gguf", "n_prompt": 0, "n_gen": 64, "n_threads": 2,
     "avg_ts": 130.0, "stddev_ts": 0.0},
])


FAKE_LLAMA_BENCH = r"""
import json, sys
from pathlib import Path

if sys.argv[1:] == ["--help"]:
    print("usage: llama-bench [options]\n  -ngl, --n-gpu-layers <n>" + DEVICE_HELP)
    sys.exit(0)
with open(Path(__file__).with_suffix(".argv"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
common = {"build_commit": "fake123", "backends": BACKENDS, "gpu_info": GPU_INFO,
          "n_gpu_layers": int(args["-ngl"]), "devices": args.get("-dev", "auto"), "n_threads": int(args["-t"])}
rows = [dict(common, n_prompt=int(args["-p"]), n_gen=0, avg_ts=400.0, samples_ts=[390.0, 400.0, 410.0]),
        dict(common, n_prompt=0, n_gen=int(args["-n"]), avg_ts=120.0, samples_ts=[119.0, 120.0, 121.0])]
print(json.dumps(rows))
"""

FAKE_PYTHON = r"""
import json, sys
from pathlib import Path

if sys.argv[1] == "-c":  # the probe: version and GPU offload support
    print(json.dumps({"version": "0.3.36", "gpu_offload": GPU_OFFLOAD}))
    sys.exit(0)
req = json.load(sys.stdin)
Path(__file__).with_suffix(".request").write_text(json.dumps(req))
n = req["repeats"]
print(json.dumps({"version": "0.3.36", "n_threads": req["n_threads"], "n_gpu_layers": req["n_gpu_layers"],
                  "op_offload": None, "gpu_offload": GPU_OFFLOAD, "system_info": "CPU : AVX2 = 1 |",
                  "pp": [0.02] * n, "ttft": [0.021] * n, "tg": [0.05] * n, "peak_rss_mib": 300.0}))
"""


def _executable(path: Path, body: str, **settings) -> Path:
    """A Python script run as a program, with `settings` as its module constants."""
    head = f"#!{sys.executable}\n" + "".join(f"{k} = {v!r}\n" for k, v in settings.items())
    path.write_text(head + body)
    path.chmod(0o755)
    return path


def fake_llama_bench(tmp_path: Path, backends: str, gpu_info: str, knows_device: bool = True,
                     name: str = "llama-bench") -> Path:
    help_text = "\n  -dev, --device <dev0/dev1/...>" if knows_device else ""
    return _executable(tmp_path / name, FAKE_LLAMA_BENCH, BACKENDS=backends, GPU_INFO=gpu_info, DEVICE_HELP=help_text)


def argv_log(binary: Path) -> list[list[str]]:
    log = binary.with_suffix(".argv")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


CFG = RunConfig(n_prompt=8, n_gen=4, repeats=3, warmup=1, seed=0)


def test_llama_bench_json_becomes_named_tests():
    entry = peers.parse_llama_bench(LLAMA_BENCH_JSON, "smollm2-135m", "m.gguf", 2)
    assert entry.available and entry.runner == "llamacpp" and entry.kind == "peer"
    by_test = {r.test: r for r in entry.results}
    assert set(by_test) == {"pp128", "tg64"}
    assert by_test["pp128"].samples == [290.0, 300.0, 310.0] and by_test["pp128"].median == 300.0
    assert by_test["tg64"].samples == [130.0]  # no samples_ts: the average stands alone
    assert entry.info["version"] == "1a2b3c4" and entry.info["device"] == "cpu"


def test_llama_bench_garbage_is_a_peer_failure():
    with pytest.raises(peers.PeerFailed, match="no JSON"):
        peers.parse_llama_bench("main: error: unknown argument", "m", "m.gguf", 2)


@pytest.mark.parametrize("knows_device", [True, False])
def test_cpu_peer_keeps_every_layer_on_the_cpu(tmp_path, knows_device):
    binary = fake_llama_bench(tmp_path, "CUDA", "NVIDIA H100 80GB HBM3", knows_device)  # even a GPU build
    tool = peers.find_llamacpp("cpu", llama_bench=str(binary))
    entry = peers.run_llamacpp(tool, Path("m.gguf"), "m", 100, CFG, 3)
    [argv] = argv_log(binary)
    assert _flag(argv, "-ngl") == "0" and _flag(argv, "-t") == "3"
    assert _flag(argv, "-dev") == ("none" if knows_device else None)  # -dev only where the binary has it
    assert entry.available and entry.runner == "llamacpp"
    assert entry.info["n_gpu_layers"] == 0 and entry.info["backends"] == "CUDA"
    assert entry.info["devices"] == ("none" if knows_device else "auto")
    assert {r.test for r in entry.results} == {"pp8", "tg4"}


def test_cuda_peer_offloads_every_layer_and_records_the_gpu(tmp_path):
    binary = fake_llama_bench(tmp_path, "CUDA", "NVIDIA H100 80GB HBM3")
    tool = peers.find_llamacpp("cuda", llama_bench=str(binary))
    entry = peers.run_llamacpp(tool, Path("m.gguf"), "m", 100, CFG, 3)
    [argv] = argv_log(binary)
    assert _flag(argv, "-ngl") == "99" and "-dev" not in argv
    assert entry.available and entry.runner == "llamacpp-cuda" and entry.kind == "peer"
    assert entry.info["backends"] == "CUDA" and entry.info["gpu_info"] == "NVIDIA H100 80GB HBM3"
    assert entry.info["n_gpu_layers"] == 99 and entry.info["binary"] == str(binary)
    assert [r.median for r in entry.results] == [400.0, 120.0]


@pytest.mark.parametrize("backends, gpu_info, why", [
    ("CPU", "", "has no CUDA backend"),
    ("BLAS", "", "has no CUDA backend"),
    ("CUDA", "", "found no GPU"),
])
def test_cuda_peer_refuses_a_llama_bench_that_did_not_run_on_a_gpu(tmp_path, backends, gpu_info, why):
    binary = fake_llama_bench(tmp_path, backends, gpu_info)
    tool = peers.find_llamacpp("cuda", llama_bench=str(binary))
    entry = peers.run_llamacpp(tool, Path("m.gguf"), "m", 100, CFG, 3)
    assert not entry.available and entry.runner == "llamacpp-cuda" and not entry.results
    assert why in entry.reason
    if why == "has no CUDA backend":
        assert "-DGGML_CUDA=ON" in entry.reason and "--llama-bench" in entry.reason


def test_llama_bench_that_is_not_executable_is_named(tmp_path):
    found = peers.find_llamacpp("cpu", llama_bench=str(tmp_path / "missing"))
    assert isinstance(found, str) and "--llama-bench" in found and "not an executable file" in found


@pytest.mark.parametrize("device, layers, runner", [("cpu", 0, "llamacpp"), ("cuda", -1, "llamacpp-cuda")])
def test_python_peer_places_the_layers_by_device(tmp_path, device, layers, runner):
    python = _executable(tmp_path / "python", FAKE_PYTHON, GPU_OFFLOAD=True)
    tool = peers.find_llamacpp(device, peer_python=str(python))
    assert isinstance(tool, peers.PeerTool) and tool.how == "python" and tool.version == "0.3.36"
    entry = peers.run_llamacpp(tool, Path("m.gguf"), "m", 100, CFG, 3)
    request = json.loads(python.with_suffix(".request").read_text())
    assert request["n_gpu_layers"] == layers and request["n_threads"] == 3
    assert entry.available and entry.runner == runner
    assert entry.info["n_gpu_layers"] == layers and entry.info["gpu_offload"] is True


def test_python_peer_without_gpu_offload_serves_the_cpu_only(tmp_path):
    python = _executable(tmp_path / "python", FAKE_PYTHON, GPU_OFFLOAD=False)
    assert isinstance(peers.find_llamacpp("cpu", peer_python=str(python)), peers.PeerTool)
    found = peers.find_llamacpp("cuda", peer_python=str(python))
    assert isinstance(found, str)
    assert "llama_supports_gpu_offload() is False" in found and "GGML_CUDA" in found


def test_cpu_placement_turns_op_offload_off_where_llama_cpp_has_it():
    from types import SimpleNamespace

    from ukgpu.tools.bench.peer_llamacpp import placement

    class Llama:
        def __init__(self, model_path, n_gpu_layers=0, op_offload=None): ...

    class OldLlama:
        def __init__(self, model_path, n_gpu_layers=0): ...

    assert placement(SimpleNamespace(Llama=Llama), 0) == {"n_gpu_layers": 0, "op_offload": False}
    assert placement(SimpleNamespace(Llama=Llama), -1) == {"n_gpu_layers": -1}
    assert placement(SimpleNamespace(Llama=OldLlama), 0) == {"n_gpu_layers": 0}


def test_unknown_peer_lists_both_llama_cpp_peers():
    reason = _find_peer("llamacpp-rocm", BenchRequest())
    assert "unknown peer 'llamacpp-rocm'" in reason and "llamacpp, llamacpp-cuda" in reason


def test_bench_runs_the_llama_bench_it_is_given(tmp_path, smollm2_path, monkeypatch, capsys):
    (tmp_path / "bin").mkdir()
    on_path = fake_llama_bench(tmp_path / "bin", "CUDA", "GPU")
    monkeypatch.setenv("PATH", f"{on_path.parent}:/usr/bin:/bin")
    given = fake_llama_bench(tmp_path, "CPU", "", name="my-llama-bench")
    out = tmp_path / "r.json"
    code = main(["bench", "-m", str(smollm2_path), "--backends", "", "--peers", "llamacpp,llamacpp-cuda",
                 "--llama-bench", str(given), "-p", "8", "-n", "4", "-r", "2", "-t", "3", "--no-kernels",
                 "-o", str(out)])
    assert code == 0
    assert argv_log(on_path) == []  # the binary on PATH was not used
    cpu_argv, cuda_argv = argv_log(given)
    for argv in (cpu_argv, cuda_argv):
        assert _flag(argv, "-m") == str(smollm2_path) and _flag(argv, "-o") == "json"
        assert (_flag(argv, "-p"), _flag(argv, "-n"), _flag(argv, "-r"), _flag(argv, "-t")) == ("8", "4", "2", "3")
    assert _flag(cpu_argv, "-ngl") == "0" and _flag(cuda_argv, "-ngl") == "99"
    report = load_report(out)
    by_runner = {e.runner: e for e in report.entries}
    assert set(by_runner) == {"llamacpp", "llamacpp-cuda"}
    assert by_runner["llamacpp"].available and by_runner["llamacpp"].info["binary"] == str(given)
    assert not by_runner["llamacpp-cuda"].available and "no CUDA backend" in by_runner["llamacpp-cuda"].reason
    assert report.versions["llama_cpp"] == "fake123" and report.versions["llama_cpp_cuda"] is None
    assert "n_gpu_layers=0 backends=CPU" in capsys.readouterr().out  # where the peer ran, in the summary


def test_peer_python_and_llama_bench_together_are_refused(tmp_path, capsys):
    code = main(["bench", "-m", "smollm2-135m", "--peers", "llamacpp", "--peer-python", sys.executable,
                 "--llama-bench", str(tmp_path / "llama-bench")])
    assert code == 1
    assert "pass one of them" in capsys.readouterr().err


def _speed_report(created: str, entries: list[Entry]) -> Report:
    return Report(created, "ukgpu bench", {"commit": "abc", "dirty": False}, {"cpu": "x", "cores": 2},
                  {}, {}, entries)


def _speed(model: str, runner: str, kind: str, pp: float, tg: float, **info) -> Entry:
    results = [Result.of("pp8", "tokens/s", [pp]), Result.of("tg4", "tokens/s", [tg])]
    return Entry(model, runner, kind, True, None, results, info)


def ratio_rows(page: str) -> dict[str, str]:
    """label -> ratio text of the rendered ratio chart."""
    svg = page[page.index('data-kind="ratio"'):]
    svg = svg[:svg.index("</svg>")]
    return dict(re.findall(r'class="tk">([^<]+)</text><rect[^>]*><title>[^<]*</title></rect>'
                           r'<text[^>]*class="vl">([^<]+)x</text>', svg))


def test_dashboard_pairs_each_backend_with_the_peer_on_its_device():
    entries = [
        _speed("m", "llamacpp", "peer", 50.0, 20.0, n_gpu_layers=0, backends="CPU", gpu_info=""),
        _speed("m", "cpu", "backend", 100.0, 10.0),
        _speed("m", "cpu-q8", "backend", 150.0, 30.0),  # the CPU with 8-bit activations: the same peer
        _speed("m", "llamacpp-cuda", "peer", 250.0, 40.0, n_gpu_layers=99, backends="CUDA", gpu_info="NVIDIA H100"),
        _speed("m", "cuda", "backend", 1000.0, 20.0),
        _speed("only-cpu-peer", "cuda", "backend", 1000.0, 20.0),  # no llamacpp-cuda here: no ratio
        _speed("only-cpu-peer", "llamacpp", "peer", 50.0, 20.0),
    ]
    page = html.render([_speed_report("2026-11-24T20:00:00Z", entries)], ["r.json"])
    assert ratio_rows(page) == {"m cpu pp8": "2", "m cpu tg4": "0.5", "m cpu-q8 pp8": "3", "m cpu-q8 tg4": "1.5",
                                "m cuda pp8": "4", "m cuda tg4": "0.5"}
    assert "Relative to llama.cpp on the same device" in page
    assert ("backend cpu with peer llamacpp, backend cpu-q8 with peer llamacpp, "
            "backend cuda with peer llamacpp-cuda") in page
    assert "<td>m</td><td>llamacpp-cuda</td><td>-</td><td>-</td><td>99</td><td>CUDA</td><td>-</td>" \
           "<td>NVIDIA H100</td>" in page  # where the peer ran


def test_dashboard_orders_peers_after_the_backends():
    entries = [_speed("m", "llamacpp", "peer", 1, 1), _speed("m", "cpu", "backend", 1, 1),
               _speed("m", "llamacpp-cuda", "peer", 1, 1), _speed("m", "cuda", "backend", 1, 1)]
    assert html._runner_order([_speed_report("2026-11-24T20:00:00Z", entries)]) == [
        "cpu", "cuda", "llamacpp", "llamacpp-cuda"]


def test_peer_python_without_llama_cpp_says_how_to_install(tmp_path):
    found = peers.find_llamacpp("cpu", sys.executable if not _has_llama_cpp() else str(tmp_path / "nope"))
    assert isinstance(found, str)
    assert "pip install llama-cpp-python==0.3.36" in found


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def test_unknown_and_unavailable_backends_have_reasons():
    assert backend_run.backend_unavailable("cpu") is None
    assert "unknown backend" in backend_run.backend_unavailable("tpu")
    reason = backend_run.backend_unavailable("cuda")
    try:
        from ukgpu.gpu.cuda.select import probe
        ok, _ = probe()
    except Exception:  # no driver bindings at all: then there must be a reason too
        ok = False
    assert (reason is None) == ok
    if not ok:
        assert len(reason) > 10


@pytest.mark.slow
def test_bench_command_writes_a_valid_report(tmp_path, smollm2_path, capsys):
    out = tmp_path / "r.json"
    code = main(["bench", "-m", str(smollm2_path), "--backends", "cpu,cuda", "--peers", "nosuchpeer",
                 "-p", "8", "-n", "2", "-r", "2", "--no-kernels", "-o", str(out)])
    assert code == 0
    report = load_report(out)
    cpu = next(e for e in report.entries if e.runner == "cpu")
    assert cpu.available, cpu.reason
    tests = {r.test: r for r in cpu.results}
    assert set(tests) == {"pp8", "tg2", "ttft", "peak_rss"}
    assert len(tests["pp8"].samples) == 2 and all(v > 0 for v in tests["pp8"].samples)
    assert tests["peak_rss"].median > 50  # MiB: the child process mapped a model and ran it
    assert 0 < tests["ttft"].median < 8 / tests["pp8"].min + 1.0
    peer = next(e for e in report.entries if e.runner == "nosuchpeer")
    assert not peer.available and "unknown peer" in peer.reason
    if backend_run.backend_unavailable("cuda"):
        cuda = next(e for e in report.entries if e.runner == "cuda")
        assert not cuda.available and cuda.reason
    assert report.machine["cores"] >= 1 and report.versions["numpy"]
    printed = capsys.readouterr().out
    assert "not available" in printed and "pp8" in printed


def test_image_that_is_not_an_image_is_listed_with_the_reason(tmp_path):
    from ukgpu.tools.bench.image_run import bench_image

    entry = bench_image(tmp_path, repeats=1)
    assert not entry.available and entry.kind == "image"
    assert "ukgpu image build" in entry.reason
