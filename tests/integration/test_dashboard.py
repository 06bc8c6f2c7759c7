"""`ukgpu dashboard` rendered by headless Chromium: charts drawn, no script errors, not blank,
self-contained, unavailable entries shown with their reasons."""

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numba
import numpy as np
import pytest

from ukgpu.tools.bench.charts import PALETTE
from ukgpu.tools.bench.schema import Entry, Report, Result
from ukgpu.tools.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
CUDA_REASON = "no NVIDIA driver (libcuda.so) on this machine"


def _report(created: str, scale: float) -> Report:
    rng = np.random.default_rng(int(scale * 100))

    def speed(test, base):
        return Result.of(test, "tokens/s", list(base * scale * (1 + 0.05 * rng.standard_normal(3))))

    entries = []
    for model, k in (("smollm2-135m", 1.0), ("qwen2.5-coder-0.5b", 0.3)):
        entries.append(Entry(model, "cpu", "backend", True, None, [speed("pp128", 40 * k), speed("tg64", 9 * k),
                                                                   Result.of("ttft", "s", [3.1 / k, 3.3 / k])]))
        entries.append(Entry(model, "llamacpp", "peer", True, None, [speed("pp128", 300 * k), speed("tg64", 130 * k)]))
        entries.append(Entry.unavailable(model, "cuda", "backend", CUDA_REASON))
    kern = [Result.of(f"{kind} attn_q Q4_1 576x576", "GB/s", [1.5 * n ** 0.3, 1.6 * n ** 0.3], n=n, bytes=207360 * (1 + n / 40),
                      flops=2 * n * 576 * 576, seconds=1e-4 * n ** 0.7, tflops=2 * n * 576 * 576 / (1e-4 * n ** 0.7) / 1e12,
                      rel_err=1e-6) for kind, n in (("mv", 1), ("mm", 32))]
    entries.append(Entry("smollm2-135m", "cpu", "kernels", True, None, kern, {"failed": {"mv x Q6_K 8x256": "relative error 0.9 > 0.05"}}))
    entries.append(Entry("-", "cpu", "ceilings", True, None, [Result.of("copy", "GB/s", [9.0, 10.0]),
                                                             Result.of("gemm_f32", "TFLOP/s", [0.1, 0.12])]))
    machine = {"cpu": "Test CPU", "cores": 2, "usable_cores": 2, "memory_bytes": 24 * 2**30,
               "gpu": {"available": False, "reason": "no nvidia-smi on PATH"}}
    return Report(created, "ukgpu bench -m smollm2-135m", {"commit": "0123456789ab", "dirty": False}, machine,
                  {"numpy": "2.4"}, {"load_average_before": [1.0, 1.0, 1.0]}, entries)


def _chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           "--enable-logging=stderr", "--v=0", *extra, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@numba.njit(cache=True)
def _unfilter(raw, height, stride, bpp):  # pragma: no cover - compiled
    out = np.zeros((height, stride), np.uint8)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        for x in range(stride):
            v = np.int32(raw[y * (stride + 1) + 1 + x])
            a = np.int32(out[y, x - bpp]) if x >= bpp else 0
            b = np.int32(out[y - 1, x]) if y > 0 else 0
            c = np.int32(out[y - 1, x - bpp]) if (x >= bpp and y > 0) else 0
            if ftype == 1:
                v += a
            elif ftype == 2:
                v += b
            elif ftype == 3:
                v += (a + b) // 2
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                v += a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
            out[y, x] = v & 0xFF
    return out


def read_png(path: Path) -> np.ndarray:
    """uint8[h, w, channels] of an 8-bit RGB/RGBA PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h, channels = 8, b"", 0, 0, 4
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            channels = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8)
    return _unfilter(raw, h, w * channels, channels).reshape(h, w, channels)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    files = []
    for i, (created, scale) in enumerate((("2026-11-24T18:00:00Z", 0.8), ("2026-11-24T21:00:00Z", 1.0))):
        files.append(_report(created, scale).save(tmp / f"r{i}.json"))
    out = tmp / "report.html"
    assert main(["dashboard", *map(str, files), "-o", str(out)]) == 0
    dom = _chromium(out, tmp, "--dump-dom", "--virtual-time-budget=2000")
    shot = tmp / "shot.png"
    snap = _chromium(out, tmp, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars")
    return {"html": out.read_text(), "dom": dom, "snap": snap, "png": shot, "tmp": tmp, "page": out}


def test_page_is_self_contained(rendered):
    html = rendered["html"]
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>]*", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"<(?:script|img|link|iframe)[^>]*\b(?:src|href)=", html)


def test_charts_drawn_without_script_errors(rendered):
    dom = rendered["dom"]
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    drawn = int(re.search(r'data-charts-drawn="(\d+)"', body).group(1))
    # speed per model (2) + ratio to the peer (1) + kernels roofline (1) + trends per model (2)
    assert drawn == 6
    assert int(re.search(r'data-marks="(\d+)"', body).group(1)) >= 20
    assert "data-errors" not in body
    assert re.search(r'<pre id="errors"></pre>', dom.stdout)
    for log in (dom.stderr, rendered["snap"].stderr):
        bad = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert not bad, bad


def test_unavailable_entries_are_visible_with_reasons(rendered):
    dom = rendered["dom"].stdout
    assert dom.count(f"not available: {CUDA_REASON}") == 2  # one per model
    assert "failed validation: relative error 0.9" in dom
    assert "Not available: cuda" in dom


def test_screenshot_shows_the_charts(rendered):
    assert rendered["snap"].returncode == 0, rendered["snap"].stderr[-2000:]
    img = read_png(rendered["png"])[:, :, :3]  # [h, w, rgb]
    assert img.shape[:2] == (2000, 1280)
    flat = img.reshape(-1, 3).astype(np.int32)
    colors = np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2])
    assert len(colors) > 200  # text antialiasing, bars, lines: not a blank page
    background = np.all(img == img[5, 5], axis=-1)
    assert 0.05 < 1 - background.mean() < 0.95
    for runner in ("cpu", "llamacpp"):  # the bars are painted in the runner's legend colour
        hexcol = re.search(r'fill="(#[0-9a-f]{6})"/><text[^>]*>' + runner + "<", rendered["html"]).group(1)
        assert hexcol in PALETTE
        rgb = np.array([int(hexcol[i : i + 2], 16) for i in (1, 3, 5)])
        assert np.sum(np.all(np.abs(img.astype(np.int32) - rgb) <= 2, axis=-1)) > 2000, (runner, hexcol)


def test_a_script_error_would_be_caught(rendered):
    """Control: the same checks flag a page whose script throws."""
    broken = rendered["tmp"] / "broken.html"
    broken.write_text(rendered["html"].replace("</body>", "<script>no_such_function()</script></body>"))
    dom = _chromium(broken, rendered["tmp"], "--dump-dom", "--virtual-time-budget=2000")
    assert 'data-errors="yes"' in dom.stdout
    assert "no_such_function" in dom.stdout
