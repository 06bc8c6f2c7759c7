"""Boot self-test: the kernel checks of `ukgpu verify` on the kernels one model uses, before the
guest serves from the GPU.

    result = self_test(backend, gguf)   # a CudaBackend made by select.create_backend
    result.ok, result.summary()         # "GPU self-test passed: 27 kernel checks in 0.4s"
                                        # "GPU self-test failed: matvec_q4_k_b1 NMSE 1.0e-02 > 1.0e-08"

The checks are `verify_kernels`' per-op cases (random inputs, poisoned outputs, a float64
reference, per-op NMSE bounds), run through the backend's own `KernelSet` on a scratch arena of
their own that is freed afterwards, so the model's arena is untouched.  Weight kernels run only
for the weight types the model holds; of the other cases' results only those naming a kernel
the model uses (`select.model_kernels`) count.  A case that raises (a fault, a refused launch)
fails the test with its error.  On a GPU the checks take well under a second (tens of small
launches); on the stand-in driver's numpy emulation ~4 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ukgpu.gpu.cuda import verify_kernels as vk
from ukgpu.gpu.cuda.arena import DeviceArena

SCRATCH_BYTES = 32 << 20  # the checks' inputs and outputs (measured: 13 MiB, tiny-llama's types)
Case = Callable[[vk.Device, np.random.Generator], list[vk.Check]]


@dataclass
class SelfTestResult:
    checks: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # "matvec_q4_k_b1 NMSE 1.0e-02 > 1.0e-08"

    @property
    def ok(self) -> bool:
        return self.checks > 0 and not self.failures

    def summary(self) -> str:
        if self.ok:
            return f"GPU self-test passed: {self.checks} kernel checks in {self.seconds:.1f}s"
        shown = "; ".join(self.failures[:3]) or "no kernel check ran"
        more = f"; and {len(self.failures) - 3} more" if len(self.failures) > 3 else ""
        return f"GPU self-test failed: {shown}{more}"


def kernels_named(check: vk.Check) -> set[str]:
    """The kernel entries a check's name mentions ("attn_decode_d64 + attn_combine_d64 window
    40" -> both entries)."""
    return {part.split()[0] for part in check.name.split(" + ") if part.strip()}


def model_cases(gguf: Any) -> list[tuple[str, Case]]:
    """(label, case) for every op family of the model: norms, rope, attention, elementwise and
    one weight-kernel case per weight type it holds."""
    qtypes = sorted({v.qtype.name for v in gguf.tensors.values() if len(v.shape) == 2})
    cases: list[tuple[str, Case]] = [
        ("rmsnorm", vk.check_rmsnorm), ("rope", vk.check_rope), ("rope_kv", vk.check_rope_kv),
        ("fused decode attention", vk.check_fused_decode), ("split argmax", vk.check_split_argmax),
        ("attention", vk.check_attention), ("elementwise", vk.check_elementwise)]
    for qtype in qtypes:
        def weights(dev: vk.Device, rng: np.random.Generator, qtype: str = qtype) -> list[vk.Check]:
            return vk.check_weight_kernels(dev, qtype, rng)
        cases.append((f"{qtype} weight kernels", weights))
    return cases


def _failure(check: vk.Check) -> str:
    if check.metric == "nmse":
        return f"{check.name} NMSE {check.value:.1e} > {check.bound:.1e}"
    return f"{check.name}: {check.detail or check.metric}"


def self_test(backend: Any, gguf: Any, seed: int = 0) -> SelfTestResult:
    """Run the model's kernel checks on `backend`'s device; never raises for a failing kernel
    (the result says which and why)."""
    from ukgpu.gpu.cuda.select import model_kernels

    used, result, start = set(model_kernels(gguf)), SelfTestResult(), time.perf_counter()
    try:
        backend.ctx.ensure_current()
        backend.ctx.sync()
        arena = DeviceArena(backend.cu, SCRATCH_BYTES)
    except Exception as exc:  # noqa: BLE001 - a GPU that cannot even start the test fails it
        result.failures.append(f"scratch memory: {type(exc).__name__}: {exc}")
        return result
    try:
        _run_cases(result, vk.Device(backend.kernels, arena), gguf, used, seed)
    finally:
        try:
            arena.free()
        except Exception:  # noqa: BLE001 - after a fault the context is gone with the memory
            pass
    result.seconds = time.perf_counter() - start
    return result


def _run_cases(result: SelfTestResult, dev: vk.Device, gguf: Any, used: set[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label, case in model_cases(gguf):
        try:
            checks = [c for c in case(dev, rng) if kernels_named(c) & used]
        except Exception as exc:  # noqa: BLE001 - a fault or refusal is a failed check
            result.failures.append(f"{label}: {type(exc).__name__}: {exc}")
            return  # a fault loses the context: later cases would only repeat it
        result.checks += len(checks)
        result.failures += [_failure(c) for c in checks if not c.ok]
