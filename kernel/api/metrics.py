"""Server counters and their Prometheus text exposition (format 0.0.4).

`ukgpu_requests_total{path,status}` counts answers by status; a client that disconnected before
its request body ended is counted with status 499 (`CLIENT_CLOSED`), not as a server error.

Routers that balance over many guests (vllm-router, LiteLLM, the Gateway API Inference
Extension's endpoint pickers) score each backend from vLLM's metric names, so the scheduler
gauges are also written under those names (`VLLM_GAUGES`), beside ukgpu's own:
`vllm:num_requests_waiting` = `ukgpu_queue_depth`, `vllm:num_requests_running` =
`ukgpu_active_slots`, and `vllm:kv_cache_usage_perc` = active slots / slots, a 0-1 fraction as
in vLLM: each slot owns a fixed KV region of `n_ctx` tokens, allocated once, so the share of
KV cache taken by running sequences is the share of slots they hold.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

_RATE_WINDOW_S = 10.0
CLIENT_CLOSED = 499  # status counted for a client that left before its request was read (nginx's code)


class Metrics:
    """Thread-safe counters; the scheduler thread and the event loop both write here."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.requests: Counter[tuple[str, int]] = Counter()  # (path, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) inside the rate window

    def reset(self) -> None:
        """Every counter back to zero: a guest restored from a snapshot starts its own count (the
        snapshot's warm-up request is not one of its requests)."""
        with self._lock:
            self.requests.clear()
            self.prompt_tokens = self.generated_tokens = 0
            self._recent.clear()

    def count_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1

    def count_prompt(self, n_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += n_tokens

    def count_generated(self, n_tokens: int) -> None:
        now = self._clock()
        with self._lock:
            self.generated_tokens += n_tokens
            self._recent.append((now, n_tokens))
            self._trim(now)

    def tokens_per_second(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / _RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()

    def render(self, gauges: dict[str, tuple[str, float]], arena: Any = None) -> str:
        """Prometheus text; `gauges` maps name -> (help, value)."""
        with self._lock:
            requests = sorted(self.requests.items())
            prompt, generated = self.prompt_tokens, self.generated_tokens
        lines = ["# HELP ukgpu_requests_total HTTP requests by path and status.",
                 "# TYPE ukgpu_requests_total counter"]
        for (path, status), n in requests:
            lines.append(f'ukgpu_requests_total{{path="{path}",status="{status}"}} {n}')
        lines += _metric("ukgpu_prompt_tokens_total", "counter", "Prompt tokens processed.", prompt)
        lines += _metric("ukgpu_generated_tokens_total", "counter", "Tokens generated.", generated)
        lines += _metric("ukgpu_tokens_per_second", "gauge",
                         f"Generated tokens per second over the last {_RATE_WINDOW_S:g} s.",
                         self.tokens_per_second())
        for name, (help_text, value) in gauges.items():
            lines += _metric(name, "gauge", help_text, value)
        lines += _vllm_lines(gauges)
        lines += _arena_lines(arena)
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]


# vLLM's name -> (help, the ukgpu gauge it mirrors); the KV fraction is computed in _vllm_lines
VLLM_GAUGES = {
    "vllm:num_requests_waiting": ("Requests waiting for a slot (vLLM's name).", "ukgpu_queue_depth"),
    "vllm:num_requests_running": ("Sequences being generated (vLLM's name).", "ukgpu_active_slots"),
}
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"


def _vllm_lines(gauges: dict[str, tuple[str, float]]) -> list[str]:
    """The scheduler gauges again under vLLM's names; nothing if the scheduler gauges are absent."""
    if not all(source in gauges for _, source in VLLM_GAUGES.values()) or "ukgpu_slots" not in gauges:
        return []
    lines: list[str] = []
    for name, (help_text, source) in VLLM_GAUGES.items():
        lines += _metric(name, "gauge", help_text, gauges[source][1])
    slots = gauges["ukgpu_slots"][1]
    usage = min(1.0, gauges["ukgpu_active_slots"][1] / slots) if slots > 0 else 0.0
    lines += _metric(VLLM_KV_USAGE, "gauge", "KV cache in use by running sequences, 0-1 (vLLM's name).", usage)
    return lines


def _arena_lines(arena: Any) -> list[str]:
    """One gauge per entry of `arena.stats()` (kernel.arena.Arena: size, used, peak, blocks, ...)."""
    if arena is None:
        return []
    lines: list[str] = []
    for key, value in sorted(arena.stats().items()):
        lines += _metric(f"ukgpu_arena_{key}", "gauge", f"Host arena: {key.replace('_', ' ')}.", value)
    return lines
