"""Peer discovery and parsing, backend availability, and one real `ukgpu bench` run."""

import json
import sys

import pytest

from ukgpu.tools.bench import backend_run, peers
from ukgpu.tools.bench.schema import load_report
from ukgpu.tools.cli import main

LLAMA_BENCH_JSON = json.dumps([
    {"build_commit": "1a2b3c4", "model_filename": "m.gguf", "n_prompt": 128, "n_gen": 0, "n_threads": 2,
     "avg_ts": 300.0, "stddev_ts": 10.0, "samples_ts": [290.0, 300.0, 310.0]},
    {"build_commit": "1a2b3c4", "model_filename": "m.gguf", "n_prompt": 0, "n_gen": 64, "n_threads": 2,
     "avg_ts": 130.0, "stddev_ts": 0.0},
])


def test_llama_bench_json_becomes_named_tests():
    entry = peers.parse_llama_bench(LLAMA_BENCH_JSON, "smollm2-135m", "m.gguf", 2)
    assert entry.available and entry.runner == "llamacpp" and entry.kind == "peer"
    by_test = {r.test: r for r in entry.results}
    assert set(by_test) == {"pp128", "tg64"}
    assert by_test["pp128"].samples == [290.0, 300.0, 310.0] and by_test["pp128"].median == 300.0
    assert by_test["tg64"].samples == [130.0]  # no samples_ts: the average stands alone
    assert entry.info["version"] == "1a2b3c4"


def test_llama_bench_garbage_is_a_peer_failure():
    with pytest.raises(peers.PeerFailed, match="no JSON"):
        peers.parse_llama_bench("main: error: unknown argument", "m", "m.gguf", 2)


def test_peer_python_without_llama_cpp_says_how_to_install(tmp_path):
    found = peers.find_llamacpp(sys.executable if not _has_llama_cpp() else str(tmp_path / "nope"))
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
        from ukgpu.gpu.cuda_backend import probe
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
