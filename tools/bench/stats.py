"""Median and spread of repeated measurements.

The median is what we report; the spread is given both as min/max and as the
interquartile range (linear interpolation between order statistics, numpy's
default), so one slow outlier moves max but not the IQR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ukgpu.llama_core.errors import UkgpuError


class StatsError(UkgpuError):
    """Statistics asked of an empty or non-finite sample."""


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(samples: list[float] | np.ndarray) -> Summary:
    """Summary of one or more finite samples."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)  # [n]
    if x.size == 0:
        raise StatsError("no samples to summarize: run at least one repeat (-r 1)")
    if not np.all(np.isfinite(x)):
        raise StatsError(f"non-finite samples {x.tolist()}: a timing failed; rerun the benchmark")
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return Summary(float(med), float(x.min()), float(x.max()), float(q1), float(q3))


def rate(count: int, seconds: list[float]) -> list[float]:
    """Per-sample throughput count/second (e.g. tokens/s) of per-sample durations."""
    if any(s <= 0 for s in seconds):
        raise StatsError(f"non-positive durations {seconds}: the clock did not advance; use more tokens")
    return [count / s for s in seconds]
