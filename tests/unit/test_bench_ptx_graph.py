"""tests/perf/bench_ptx_gpu.py on the stand-in driver: kernel timings come from replays of a
captured graph, not from Python launches.

The stand-in gets CUDA events over a device clock that the test defines: 1 us per kernel run from a
graph replay, 1 ms per eager launch (Python's cost, exaggerated).  A benchmark that times its
kernels from graph replays reports exactly 1 us a launch; one that times eager launches, 1000 us.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ukgpu.gpu.cuda.driver import open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.ptx_kernels.loader import KernelManifestError

from fakes.cuda_driver import FakeDriver

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import bench_ptx_gpu as bench  # noqa: E402

GRAPH_RUN_MS, EAGER_MS = 1e-3, 1.0


class TimedFake(FakeDriver):
    """FakeDriver with events stamped by the device clock above (after the stream has run)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[int, float] = {}

    def _clock_ms(self) -> float:
        return self.graph_kernel_runs * GRAPH_RUN_MS + len(self.launches) * EAGER_MS

    def cuEventCreate(self, flags: int) -> tuple:
        self.events[len(self.events) + 1] = 0.0
        return 0, len(self.events)

    def cuEventRecord(self, event: int, stream) -> tuple:
        err = self.cuStreamSynchronize(stream)[0]
        self.events[event] = self._clock_ms()
        return (err,)

    def cuEventSynchronize(self, event: int) -> tuple:
        return (0,)

    def cuEventElapsedTime(self, start: int, end: int) -> tuple:
        return 0, self.events[end] - self.events[start]

    def cuEventDestroy(self, event: int) -> tuple:
        return (0,)


@pytest.fixture
def kernels() -> tuple[KernelSet, TimedFake]:
    fake = TimedFake()
    return KernelSet(open_device(0, fake)), fake


def test_matvec_timing_comes_from_graph_replays_not_python_launches(kernels):
    ks, fake = kernels
    counts = bench.FULL["matvec"]
    with bench.scratch(ks) as dev:
        r = bench.bench_matvec(dev, "Q8_0", 256, 256, 1, np.random.default_rng(0))
    assert fake.launches == []  # no kernel launched eagerly (the stand-in names a kernel by its
    # image, and identical images share a name: count them all)
    assert fake.graph_launches == counts.warmup + counts.replays
    assert fake.graph_kernel_runs == counts.per_graph * (counts.warmup + counts.replays)
    assert r["us"] == pytest.approx(GRAPH_RUN_MS * 1e3)  # one kernel's device time, not Python's


def test_a_two_kernel_graph_times_both_and_divides_by_launches_per_graph(kernels):
    ks, fake = kernels
    counts = bench.Counts(per_graph=3, replays=4, warmup=1)
    with bench.scratch(ks) as dev:
        r = bench.bench_attn_decode(dev, 128, 12, 2, 128, 2, np.random.default_rng(1), counts)
    assert fake.launches == [] and fake.graph_launches == 5
    assert fake.graph_kernel_runs == 2 * 3 * 5  # split + combine, 3 of each a graph
    assert r["us"] == pytest.approx(2 * GRAPH_RUN_MS * 1e3)


def test_a_launch_refused_while_capturing_leaves_the_stream_usable(kernels):
    ks, fake = kernels
    with bench.scratch(ks) as dev:
        with pytest.raises(KernelManifestError):
            bench.graph_time_ms(ks, ("matvec_q8_0_b1",), {"N": 256, "K": 256, "B": 1},
                                bench.Counts(2, 1, 0))
        r = bench.bench_gemm(dev, "F16", 32, 64, 64, np.random.default_rng(2), bench.Counts(2, 2, 0))
    assert fake.graph_kernel_runs == 4 and r["us"] == pytest.approx(GRAPH_RUN_MS * 1e3)


def test_graph_timing_captures_even_when_eager_launches_wait(kernels, monkeypatch):
    """UKGPU_CUDA_SYNC=1 (each eager launch waits for the stream) must not reach the capture:
    a wait inside it would invalidate the graph."""
    ks, fake = kernels
    ks.sync = True
    with bench.scratch(ks) as dev:
        r = bench.bench_matvec(dev, "Q8_0", 256, 256, 8, np.random.default_rng(3),
                               bench.Counts(3, 2, 0))
    assert ks.sync is True and fake.launches == [] and fake.graph_kernel_runs == 6
    assert r["us"] == pytest.approx(GRAPH_RUN_MS * 1e3)
