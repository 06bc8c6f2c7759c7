"""`ukgpu dashboard`: one self-contained HTML page from one or more results files.

Sections: the files and machines; what was not available and why; tokens/s
per model (every backend and peer); ukgpu relative to llama.cpp on the same
device (backend cpu / peer llamacpp, backend cuda / peer llamacpp-cuda) and
where each peer ran; kernels on the
roofline of the ceilings measured in the same run; trends across files (by
their timestamps); every number in a table.  Charts are inline SVG; the only
script is inline: it reports errors into the page and marks when the charts
are in place (`data-charts-drawn` on <body>).
"""

from __future__ import annotations

from html import escape

from ukgpu.tools.bench import charts
from ukgpu.tools.bench.peers import BACKEND_DEVICE, BACKEND_PEER
from ukgpu.tools.bench.schema import Entry, Report

SPEED_UNIT = "tokens/s"
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1240px;padding:16px;color:#222;background:#f6f7f9}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:24px 0 8px;border-bottom:1px solid #ccc}
.grid2{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;flex:1 1 560px;max-width:740px}
svg.chart{width:100%;height:auto}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#eef}td.n{text-align:right;font-variant-numeric:tabular-nums}.na{background:#fff4e5}
.ct{font-size:15px;font-weight:600}.al{font-size:13px;fill:#333}.tk{font-size:11px;fill:#444}.lg{font-size:12px}
.vl{font-size:10px;fill:#222}.grid{stroke:#e3e3e3}.axis{stroke:#333}.wh{stroke:#000;stroke-width:1.2}
.one{stroke:#000;stroke-dasharray:4 3}.roof{fill:none;stroke:#000;stroke-width:2}.mark:hover{opacity:.7}
#errors{color:#b00;font-weight:600}
"""
SCRIPT = """
window.onerror=function(msg,src,line){var e=document.getElementById('errors');
 e.textContent+='script error: '+msg+' (line '+line+')\\n';document.body.setAttribute('data-errors','yes');};
document.addEventListener('DOMContentLoaded',function(){
 var n=document.querySelectorAll('svg.chart .mark').length;
 document.body.setAttribute('data-charts-drawn',String(document.querySelectorAll('svg.chart').length));
 document.body.setAttribute('data-marks',String(n));});
"""


def _latest(reports: list[Report]) -> dict[tuple[str, str, str], tuple[Entry, Report]]:
    """(model, runner, kind) -> its entry in the newest report that has it."""
    out: dict[tuple[str, str, str], tuple[Entry, Report]] = {}
    for rep in sorted(reports, key=lambda r: r.created):
        for e in rep.entries:
            out[(e.model, e.runner, e.kind)] = (e, rep)
    return out


def _runner_order(reports: list[Report]) -> list[str]:
    """Runners in order of first appearance, peers after every ukgpu backend."""
    names = [e.runner for r in reports for e in r.entries]
    peers = {e.runner for r in reports for e in r.entries if e.kind == "peer"}
    return sorted(dict.fromkeys(names), key=lambda n: (n in peers, names.index(n)))


def render(reports: list[Report], sources: list[str]) -> str:
    latest = _latest(reports)
    order = _runner_order(reports)
    sections = [_files(reports, sources), _unavailable(latest), _speed(latest, order), _ratios(latest, order),
                _kernels(latest, order), _image(latest), _trends(reports, order), _table(latest)]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>ukgpu benchmark report</title><style>{CSS}</style><script>{SCRIPT}</script></head>"
            "<body><h1>ukgpu benchmark report</h1><pre id=\"errors\"></pre>" + "\n".join(sections) + "</body></html>\n")


def _files(reports: list[Report], sources: list[str]) -> str:
    rows = []
    for rep, src in sorted(zip(reports, sources), key=lambda p: p[0].created):
        m = rep.machine
        gpu = m.get("gpu", {})
        gpu_text = (f"{gpu.get('name')} (driver {gpu.get('driver')}, CUDA {gpu.get('cuda')})" if gpu.get("available")
                    else f"none: {gpu.get('reason', 'not recorded')}")
        mem = m.get("memory_bytes")
        load = rep.config.get("load_average_before")
        commit = (rep.git.get("commit") or "?")[:10] + (" (modified)" if rep.git.get("dirty") else "")
        rows.append(f"<tr><td>{escape(src)}</td><td>{escape(rep.created)}</td><td>{escape(commit)}</td>"
                    f"<td>{escape(str(m.get('cpu')))}{escape(_cpu_detail(m))}, {m.get('usable_cores')}/{m.get('cores')} cores, "
                    f"{(mem or 0) / 2**30:.0f} GiB</td><td>{escape(gpu_text)}</td>"
                    f"<td>{f'{load[0]:.2f}' if load else '?'}</td><td><code>{escape(rep.command)}</code></td></tr>")
    return ("<h2>Results files</h2><table><tr><th>file</th><th>created (UTC)</th><th>commit</th><th>CPU</th>"
            "<th>GPU</th><th>load avg (1 min)</th><th>command</th></tr>" + "".join(rows) + "</table>")


def _unavailable(latest: dict) -> str:
    rows = [f"<tr class=\"na\"><td>{escape(e.model)}</td><td>{escape(e.runner)}</td><td>{escape(e.kind)}</td>"
            f"<td>not available: {escape(e.reason or '')}</td></tr>"
            for (e, _) in latest.values() if not e.available]
    rows += [f"<tr class=\"na\"><td>{escape(e.model)}</td><td>{escape(e.runner)}</td><td>{escape(test)}</td>"
             f"<td>failed validation: {escape(why)}</td></tr>"
             for (e, _) in latest.values() for test, why in e.info.get("failed", {}).items()]
    if not rows:
        return "<h2>Not available</h2><p>Every requested backend, peer and measurement ran.</p>"
    return ("<h2>Not available</h2><table><tr><th>model</th><th>runner</th><th>what</th><th>reason</th></tr>"
            + "".join(rows) + "</table>")


def _models(latest: dict) -> list[str]:
    return list(dict.fromkeys(m for (m, _, kind) in latest if kind in ("backend", "peer")))


def _speed(latest: dict, order: list[str]) -> str:
    cards = []
    for model in _models(latest):
        bars = [charts.Bar(r.test, e.runner, r.median, r.min, r.max)
                for (m, _, kind), (e, _) in latest.items() if m == model and kind in ("backend", "peer")
                for r in e.results if r.unit == SPEED_UNIT]
        missing = [e.runner for (m, _, kind), (e, _) in latest.items()
                   if m == model and kind in ("backend", "peer") and not e.available]
        note = f"<p>Not available: {escape(', '.join(missing))} (reasons above).</p>" if missing else ""
        chart = charts.bar_chart(f"{model}: tokens/s (higher is better)", SPEED_UNIT, bars, order) if bars else ""
        cards.append(f"<div class=\"card\">{chart}{note}</div>")
    return "<h2>Speed per model</h2><div class=\"grid2\">" + "".join(cards) + "</div>"


def _ratios(latest: dict, order: list[str]) -> str:
    """Each backend's tokens/s over its own device's llama.cpp peer, per model and test."""
    rows = []
    for (model, runner, kind), (e, _) in latest.items():
        if kind != "backend" or not e.available or runner not in BACKEND_DEVICE:
            continue
        peer = latest.get((model, BACKEND_PEER[BACKEND_DEVICE[runner]], "peer"))
        if peer is None or not peer[0].available:
            continue
        theirs = {r.test: r.median for r in peer[0].results if r.unit == SPEED_UNIT}
        rows += [(f"{model} {runner} {r.test}", r.median / theirs[r.test], runner)
                 for r in e.results if r.unit == SPEED_UNIT and theirs.get(r.test)]
    pairs = ", ".join(f"backend {backend} with peer {BACKEND_PEER[device]}" for backend, device in BACKEND_DEVICE.items())
    head = f"<h2>Relative to llama.cpp on the same device</h2><p>Pairs: {escape(pairs)}.</p>"
    if not rows:
        body = "<p>No backend and its device's peer measured the same test on the same model.</p>"
    else:
        body = ("<div class=\"card\">" + charts.ratio_chart(
            "ukgpu speed relative to llama.cpp on the same device (same model, test, threads)", rows, order)
            + "</div>")
    return head + body + _peer_devices(latest)


PEER_FACTS = ("via", "version", "n_gpu_layers", "backends", "gpu_offload", "gpu_info")


def _peer_devices(latest: dict) -> str:
    """Where each peer says it ran: backends, GPU support and name, layers offloaded."""
    rows = ["<tr><td>" + "</td><td>".join(escape(str(v)) for v in
                                          (e.model, e.runner, *(e.info.get(k, "-") for k in PEER_FACTS)))
            + "</td></tr>" for (e, _) in latest.values() if e.kind == "peer" and e.available]
    if not rows:
        return ""
    return ("<table><tr><th>model</th><th>peer</th><th>via</th><th>version</th><th>GPU layers</th>"
            "<th>backends</th><th>GPU offload</th><th>GPU</th></tr>" + "".join(rows) + "</table>")


def _kernels(latest: dict, order: list[str]) -> str:
    cards, rows = [], []
    for (model, runner, kind), (e, rep) in latest.items():
        if kind != "kernels" or not e.available:
            continue
        ceil = next((c for c in rep.entries if c.kind == "ceilings" and c.runner == runner and c.available), None)
        bw = next((r.median for r in ceil.results if r.test == "copy"), None) if ceil else None
        peak = next((r.median for r in ceil.results if r.unit == "TFLOP/s"), None) if ceil else None
        points = [(r.test, r.extra["flops"] / r.extra["bytes"], r.extra["tflops"] * 1e3, r.test.split()[0])
                  for r in e.results]
        cards.append("<div class=\"card\">" + charts.roofline_chart(
            f"{model} on {runner}: matmul kernels vs roofline", points, bw, peak, ["mv", "mm"]) + "</div>")
        for r in e.results:
            share = f"{100 * r.median / bw:.0f}%" if bw else "?"
            rows.append(f"<tr><td>{escape(model)}</td><td>{escape(runner)}</td><td>{escape(r.test)}</td>"
                        f"<td class=\"n\">{r.median:.2f}</td><td class=\"n\">{share}</td>"
                        f"<td class=\"n\">{r.extra['tflops'] * 1e3:.2f}</td><td class=\"n\">{r.extra['seconds'] * 1e6:.0f}</td>"
                        f"<td class=\"n\">{r.extra['rel_err']:.1e}</td></tr>")
    if not cards:
        return "<h2>Kernels</h2><p>No kernel measurements in these files.</p>"
    table = ("<table><tr><th>model</th><th>runner</th><th>kernel</th><th>GB/s</th><th>of copy ceiling</th>"
             "<th>GFLOP/s</th><th>us/call</th><th>rel. error vs CPU ref</th></tr>" + "".join(rows) + "</table>")
    return "<h2>Kernels</h2><div class=\"grid2\">" + "".join(cards) + "</div>" + table


def _image(latest: dict) -> str:
    found = [e for (e, _) in latest.values() if e.kind == "image" and e.available]
    if not found:
        return ""
    bars = [charts.Bar(r.test.replace("guest_", ""), "image", r.median, r.min, r.max)
            for r in found[0].results if r.median > 0]
    chart = charts.bar_chart("Image: boot to READY and the guest's steps (lower is better)", "s", bars, ["image"])
    where = escape(str(found[0].info.get("image", "")))
    return (f"<h2>Image boot</h2><div class=\"card\">{chart}<p>Image {where}; host wall time to the READY "
            "line, then each step the guest timed itself.</p></div>")


def _trends(reports: list[Report], order: list[str]) -> str:
    reps = sorted(reports, key=lambda r: r.created)
    if len(reps) < 2:
        return "<h2>Trends</h2><p>One results file: pass two or more to see trends over time.</p>"
    cards = []
    for model in dict.fromkeys(e.model for r in reps for e in r.entries if e.kind in ("backend", "peer")):
        mine = [r for r in reps if any(e.model == model and e.kind in ("backend", "peer") for e in r.entries)]
        labels = [r.created[5:16].replace("T", " ") for r in mine]  # "MM-DD HH:MM" (UTC)
        series: dict[str, list[float | None]] = {}
        for i, rep in enumerate(mine):
            for e in rep.entries:
                if e.model != model or e.kind not in ("backend", "peer"):
                    continue
                for r in e.results:
                    if r.unit == SPEED_UNIT:
                        series.setdefault(f"{e.runner} {r.test}", [None] * len(mine))[i] = r.median
        series = {k: v for k, v in series.items() if sum(x is not None for x in v) >= 2}
        if series:
            names = list(series)
            cards.append("<div class=\"card\">" + charts.line_chart(
                f"{model}: tokens/s over time", SPEED_UNIT, labels, series, names) + "</div>")
    if not cards:
        return "<h2>Trends</h2><p>No model was measured in two or more of these files yet.</p>"
    return "<h2>Trends</h2><div class=\"grid2\">" + "".join(cards) + "</div>"


def _table(latest: dict) -> str:
    rows = []
    for (e, rep) in latest.values():
        for r in e.results:
            rows.append(f"<tr><td>{escape(e.model)}</td><td>{escape(e.runner)}</td><td>{escape(r.test)}</td>"
                        f"<td class=\"n\">{r.median:.4g}</td><td class=\"n\">{r.min:.4g} .. {r.max:.4g}</td>"
                        f"<td class=\"n\">{r.q1:.4g} .. {r.q3:.4g}</td><td class=\"n\">{len(r.samples)}</td>"
                        f"<td>{escape(r.unit)}</td><td>{escape(rep.created)}</td></tr>")
    return ("<h2>All results</h2><table><tr><th>model</th><th>runner</th><th>test</th><th>median</th>"
            "<th>min .. max</th><th>IQR</th><th>n</th><th>unit</th><th>from file created</th></tr>"
            + "".join(rows) + "</table>")


def _cpu_detail(m: dict) -> str:
    """" (AuthenticAMD family 23 model 1; avx2 fma f16c)" from a report's machine, or "" (older reports)."""
    if "cpu_id" not in m:
        return ""
    simd = [f for f in m.get("cpu_simd", []) if f not in ("sse4_2", "avx")]
    return f" ({m['cpu_id']}; {' '.join(simd) or 'no AVX2'})"
