"""A plain-text table of a Report for the terminal."""

from __future__ import annotations

from ukgpu.tools.bench.schema import Report


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


DEVICE_FACTS = ("n_gpu_layers", "backends", "gpu_offload", "gpu_info")  # what a llama.cpp peer reports


def _device_facts(info: dict) -> str:
    return " ".join(f"{k}={info[k]}" for k in DEVICE_FACTS if info.get(k) not in (None, ""))


def print_summary(report: Report) -> None:
    rows = [("MODEL", "RUNNER", "TEST", "MEDIAN", "MIN..MAX", "UNIT")]
    for e in report.entries:
        if not e.available:
            rows.append((e.model, e.runner, e.kind, "not available", "", e.reason or ""))
            continue
        for r in e.results:
            rows.append((e.model, e.runner, r.test, _fmt(r.median), f"{_fmt(r.min)}..{_fmt(r.max)}", r.unit))
        for test, why in e.info.get("failed", {}).items():
            rows.append((e.model, e.runner, test, "FAILED", "", why))
        if e.kind == "peer" and _device_facts(e.info):
            rows.append((e.model, e.runner, "ran on", "", "", _device_facts(e.info)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])


def markdown_table(reports: list[Report]) -> str:
    """tokens/s, TTFT and peak RSS per model and runner (newest file first wins), as Markdown;
    unavailable entries keep their reasons."""
    rows = ["| model | runner | test | median | min .. max | unit | file created |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for rep in sorted(reports, key=lambda r: r.created, reverse=True):
        for e in rep.entries:
            if e.kind not in ("backend", "peer", "image") or (e.model, e.runner) in seen:
                continue
            seen.add((e.model, e.runner))
            if not e.available:
                rows.append(f"| {e.model} | {e.runner} | - | not available: {e.reason} | | | {rep.created} |")
            for r in e.results:
                rows.append(f"| {e.model} | {e.runner} | {r.test} | {_fmt(r.median)} | {_fmt(r.min)} .. {_fmt(r.max)} "
                            f"| {r.unit} | {rep.created} |")
    return "\n".join(rows) + "\n"
