"""The versioned results file: round trip, versioning, clear errors on malformed files."""

import copy
import json

import pytest

from ukgpu.tools.bench.schema import (
    SCHEMA_VERSION,
    BenchResultsError,
    Entry,
    Report,
    Result,
    load_report,
    report_from_dict,
)


def make_report() -> Report:
    ok = Entry("smollm2-135m", "cpu", "backend", True, None,
               [Result.of("pp128", "tokens/s", [100.0, 120.0, 110.0]), Result.of("ttft", "s", [1.2, 1.1, 1.3])],
               {"threads": 2})
    kern = Entry("smollm2-135m", "cpu", "kernels", True, None,
                 [Result.of("mv attn_q Q4_1 576x576", "GB/s", [3.0, 3.5], bytes=207360, flops=663552,
                            seconds=6e-5, tflops=1.1e-5, rel_err=1e-6)])
    gone = Entry.unavailable("smollm2-135m", "cuda", "backend", "no NVIDIA driver")
    return Report("2026-11-24T20:00:00Z", "ukgpu bench -m smollm2-135m", {"commit": "abc", "dirty": False},
                  {"cpu": "x", "cores": 2}, {"numpy": "2.4"}, {"n_prompt": 128}, [ok, kern, gone])


def test_round_trip_through_a_file(tmp_path):
    report = make_report()
    path = report.save(tmp_path / "r.json")
    back = load_report(path)
    assert back == report
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["entries"][0]["results"][0]["median"] == 110.0
    assert data["entries"][2] == {"model": "smollm2-135m", "runner": "cuda", "kind": "backend", "available": False,
                                  "reason": "no NVIDIA driver", "results": [], "info": {}}


@pytest.mark.parametrize("version, hint", [(SCHEMA_VERSION + 1, "upgrade ukgpu"), (0, "rerun `ukgpu bench`")])
def test_other_schema_versions_are_refused_with_what_to_do(version, hint):
    data = make_report().to_dict()
    data["schema_version"] = version
    with pytest.raises(BenchResultsError, match=hint):
        report_from_dict(data)


def _broken(mutate) -> dict:
    data = copy.deepcopy(make_report().to_dict())
    mutate(data)
    return data


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("schema_version"), "schema_version"),
    (lambda d: d.pop("machine"), "results.machine"),
    (lambda d: d["entries"][0].update(kind="turbo"), "entries[0].kind"),
    (lambda d: d["entries"][2].update(reason=None), "entries[2].reason"),
    (lambda d: d["entries"][0]["results"][0].update(samples=[]), "entries[0].results[0].samples"),
    (lambda d: d["entries"][0]["results"][0].update(samples=[1, "fast"]), "entries[0].results[0].samples"),
    (lambda d: d["entries"][0]["results"][0].update(median=999.0), "entries[0].results[0].median"),
    (lambda d: d["entries"][0]["results"][1].pop("unit"), "entries[0].results[1].unit"),
    (lambda d: d["entries"][1].update(available="yes"), "entries[1].available"),
])
def test_malformed_files_name_the_bad_field(mutate, where):
    with pytest.raises(BenchResultsError) as info:
        report_from_dict(_broken(mutate))
    assert where in str(info.value)


def test_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(BenchResultsError, match="cannot read"):
        load_report(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BenchResultsError, match="not JSON"):
        load_report(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(BenchResultsError, match="not a JSON object"):
        load_report(bad)


def test_dashboard_command_refuses_a_malformed_file_in_one_line(tmp_path, capsys):
    from ukgpu.tools.cli import main

    data = make_report().to_dict()
    data["entries"][0]["results"][0]["median"] = 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["dashboard", str(bad), "-o", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ukgpu: error:") and "\n" not in err and "entries[0].results[0].median" in err
    assert not (tmp_path / "r.html").exists()


def test_machine_names_the_cpu_and_its_simd_paths():
    """The figures depend on the instruction sets (Zen 1's AVX2 vs an AVX-512 core): every report
    carries them, and the dashboard's machine column shows them."""
    from pathlib import Path

    from ukgpu.tools.bench import html, machine

    m = machine.machine_info()
    flags = set(Path("/proc/cpuinfo").read_text().split("\n\n")[0].split("flags", 1)[1].split("\n")[0].split())
    assert m["cpu_simd"] == [f for f in machine.SIMD_FLAGS if f in flags]
    assert m["cpu_id"].split(" family ")[0] in Path("/proc/cpuinfo").read_text()
    assert m["cpu_id"] in html._cpu_detail(m)
    assert html._cpu_detail({"cpu": "old report"}) == ""
