"""The versioned results file written by `ukgpu bench` and read by `ukgpu dashboard`.

    {"schema_version": 1, "created": ISO-8601 UTC, "command": str,
     "git": {"commit", "dirty"}, "machine": {...}, "versions": {...}, "config": {...},
     "entries": [{"model", "runner", "kind", "available", "reason",
                  "results": [{"test", "unit", "samples", "median", "min", "max", "q1", "q3",
                               "extra"}]}]}

`kind` is "backend" (a ukgpu backend), "peer" (another implementation), "kernels"
(per-matmul measurements; `extra` has bytes, flops, ceiling), "ceilings" (machine
limits measured in the same run) or "image" (boot-to-READY).  An entry that
could not run has `available: false`, a `reason`, and no results: it is kept so
the report shows it.  Reading checks every field and that each median agrees
with its samples, and names the offending field when one does not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ukgpu.llama_core.errors import UkgpuError
from ukgpu.tools.bench.stats import summarize

SCHEMA_VERSION = 1
KINDS = ("backend", "peer", "kernels", "ceilings", "image")


class BenchResultsError(UkgpuError):
    """A results file is missing, not JSON, of another schema version, or malformed."""


@dataclass
class Result:
    test: str  # "pp128", "tg64", "ttft", "peak_rss", "mv blk.0.attn_q.weight", ...
    unit: str  # "tokens/s", "s", "MiB", "GB/s", "TFLOP/s"
    samples: list[float]
    median: float
    min: float
    max: float
    q1: float
    q3: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, test: str, unit: str, samples: list[float], **extra: Any) -> Result:
        s = summarize(samples)
        return cls(test, unit, [float(v) for v in samples], s.median, s.min, s.max, s.q1, s.q3, extra)


@dataclass
class Entry:
    model: str  # model name (or "-" for machine-wide entries)
    runner: str  # "cpu", "cuda", "llamacpp", "image", ...
    kind: str  # one of KINDS
    available: bool
    reason: str | None = None  # why it is not available (None when it is)
    results: list[Result] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. threads, model file, backend detail

    @classmethod
    def unavailable(cls, model: str, runner: str, kind: str, reason: str) -> Entry:
        return cls(model, runner, kind, False, reason)


@dataclass
class Report:
    created: str
    command: str
    git: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, Any]
    config: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def load_report(path: str | Path) -> Report:
    """Read and validate one results file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise BenchResultsError(f"cannot read results file {path}: {exc.strerror}; check the path") from None
    except json.JSONDecodeError as exc:
        raise BenchResultsError(f"{path} is not JSON ({exc.msg} at line {exc.lineno}); "
                                "pass a file written by `ukgpu bench -o`") from None
    return report_from_dict(data, str(path))


def report_from_dict(data: Any, where: str = "results") -> Report:
    _need(isinstance(data, dict), where, "is not a JSON object")
    version = data.get("schema_version")
    _need(isinstance(version, int), where, "has no integer schema_version: not a `ukgpu bench` results file")
    if version != SCHEMA_VERSION:
        hint = "upgrade ukgpu to read it" if version > SCHEMA_VERSION else "rerun `ukgpu bench` to refresh it"
        raise BenchResultsError(f"{where}: schema_version {version} is not supported "
                                f"(this ukgpu reads {SCHEMA_VERSION}); {hint}")
    fields = {"created": str, "command": str, "git": dict, "machine": dict, "versions": dict,
              "config": dict, "entries": list}
    for key, kind in fields.items():
        _need(isinstance(data.get(key), kind), f"{where}.{key}", f"is missing or not a {kind.__name__}")
    entries = [entry_from_dict(e, f"{where}.entries[{i}]") for i, e in enumerate(data["entries"])]
    return Report(data["created"], data["command"], data["git"], data["machine"], data["versions"],
                  data["config"], entries)


def entry_from_dict(e: Any, where: str) -> Entry:
    _need(isinstance(e, dict), where, "is not an object")
    for key in ("model", "runner", "kind"):
        _need(isinstance(e.get(key), str), f"{where}.{key}", "is missing or not a string")
    _need(e["kind"] in KINDS, f"{where}.kind", f"is {e['kind']!r}, not one of {KINDS}")
    _need(isinstance(e.get("available"), bool), f"{where}.available", "is missing or not a boolean")
    reason = e.get("reason")
    if not e["available"]:
        _need(isinstance(reason, str) and reason != "", f"{where}.reason", "must say why the entry is unavailable")
    _need(isinstance(e.get("results", []), list), f"{where}.results", "is not a list")
    _need(isinstance(e.get("info", {}), dict), f"{where}.info", "is not an object")
    results = [_result(r, f"{where}.results[{i}]") for i, r in enumerate(e.get("results", []))]
    return Entry(e["model"], e["runner"], e["kind"], e["available"], reason, results, e.get("info", {}))


def _result(r: Any, where: str) -> Result:
    _need(isinstance(r, dict), where, "is not an object")
    for key in ("test", "unit"):
        _need(isinstance(r.get(key), str) and r[key] != "", f"{where}.{key}", "is missing or empty")
    samples = r.get("samples")
    _need(isinstance(samples, list) and len(samples) > 0 and all(_is_num(v) for v in samples),
          f"{where}.samples", "must be a non-empty list of numbers")
    for key in ("median", "min", "max", "q1", "q3"):
        _need(_is_num(r.get(key)), f"{where}.{key}", "is missing or not a number")
    expect = summarize(samples)
    for key in ("median", "min", "max"):
        ok = abs(r[key] - getattr(expect, key)) <= 1e-9 * max(1.0, abs(getattr(expect, key)))
        _need(ok, f"{where}.{key}", f"is {r[key]} but the samples give {getattr(expect, key)}")
    extra = r.get("extra", {})
    _need(isinstance(extra, dict), f"{where}.extra", "is not an object")
    return Result(r["test"], r["unit"], [float(v) for v in samples], float(r["median"]), float(r["min"]),
                  float(r["max"]), float(r["q1"]), float(r["q3"]), extra)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise BenchResultsError(f"{where} {what}; pass a file written by `ukgpu bench -o`")
