"""`ukgpu verify`: the CUDA backend against the CPU reference, at three levels.

- kernels: every manifest kernel on random inputs (`cuda_verify_kernels`), through the artifact
  the backend uses (the cubin on H100/H200) and again through the portable sm_80 PTX (driver JIT).
- layers: the output of every block (the residual after attention and after the MLP) of a real
  model on a prompt, CUDA vs the float64 CPU backend, by NMSE.
- e2e: the prompt's logits, then a greedy continuation decoded through the CUDA graph vs the CPU
  model's greedy tokens (a divergence is excused only at a near tie, `near_tie`); where kernels
  launch with programmatic dependent launch (sm_90+), the graph decode's logits with it against
  a graph recorded from plain launches, bit for bit (`pdl_checks`: a kernel reading an
  activation before the kernel writing it had finished would differ).

Every kernel launch of verify waits for its kernel, so a fault names the kernel; once a fault has
lost the GPU context, the checks after it are reported as not run (`verify_checks.Guard`).

`run(opts)` returns the exit code: 0 all pass, 1 any mismatch, 2 no GPU (after checking what can
be checked without one: the kernel manifests and their artifacts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ukgpu.gpu.cuda.verify_checks import Check, Guard, nmse_check
from ukgpu.gpu.cuda.verify_kernels import kernel_checks
from ukgpu.llama_core.errors import UkgpuError

LAYER_BOUND = 1e-3
LOGITS_BOUND = 1e-3
# A greedy divergence (GPU token g, CPU token c) is excused only when the CPU's own logits put g
# within max(NEAR_TIE_REL * (max - min of the row), NEAR_TIE_FLOOR) of c.  Derivation: decode on
# the GPU differs from the float64 CPU mainly by the f16 KV cache (2^-11 relative on K and V),
# logits NMSE ~1e-6, i.e. an error of rms ~1e-3 x rms(logits) on each logit and ~1.4e-3 x rms on
# a gap between two; a row's spread (max - min) is ~8 rms for a vocabulary of 10^4-10^5, so
# 1e-3 x spread is ~6 standard deviations of that gap error: a larger gap crossed is a real
# mismatch.  The floor covers rows with no spread (fp32 ulps of logits of size ~30: ~4e-6).
# The old absolute 0.1 excused most divergences of random-weight models (top-2 gaps ~0.1).
NEAR_TIE_REL, NEAR_TIE_FLOOR = 1e-3, 1e-4
EXIT_OK, EXIT_MISMATCH, EXIT_NO_GPU = 0, 1, 2
PORTABLE_TARGET = "sm_80"
KERNEL_SCRATCH_BYTES = 64 << 20  # the kernel checks' inputs and outputs (~22 MiB measured)
DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@dataclass
class VerifyOptions:
    model: str = "smollm2-135m"
    kernels: bool = True
    layers: bool = True
    e2e: bool = True
    json_out: Path | None = None
    device: int = 0
    n_generate: int = 16
    seed: int = 0


@dataclass
class Report:
    status: str = "pass"  # "pass" | "fail" | "no_gpu"
    device: str = ""
    message: str = ""
    checks: list[Check] = field(default_factory=list)
    kernels_loaded: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"status": self.status, "device": self.device, "message": self.message,
                "checks": [c.to_json() for c in self.checks], "kernels_loaded": self.kernels_loaded}


class _Recording:
    """A backend proxy that keeps a host copy of every residual sum (`add`, `matmul_add`) of the
    forward."""

    def __init__(self, inner: Any):
        self.inner, self.blocks = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def add(self, x: Any, y: Any) -> Any:
        return self._keep(self.inner.add(x, y))

    def matmul_add(self, x: Any, a: Any, weight: Any) -> Any:
        return self._keep(self.inner.matmul_add(x, a, weight))

    def _keep(self, out: Any) -> Any:
        self.blocks.append(np.array(self.inner.to_host(out), dtype=np.float64))
        return out


def manifest_checks() -> list[Check]:
    """What needs no GPU: every entry of every target manifest has its artifacts, hashes intact."""
    from ukgpu.ptx_kernels.loader import Manifests

    m = Manifests.load()
    checks = []
    for target, man in sorted(m.per_target.items()):
        bad = []
        for name, entry in man["entries"].items():
            for kind, art in entry["artifacts"].items():
                path = m.build_dir / target / art["file"]
                if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != art["sha256"]:
                    bad.append(f"{name}.{kind}")
        checks.append(Check("manifest", f"{target}: {len(man['entries'])} entries", "exact",
                            len(bad), 0, not bad, ", ".join(bad[:5])))
    return checks


def _prompt_ids(gguf: Any) -> np.ndarray:
    try:
        from ukgpu.llama_core.text.tokenizer import Tokenizer

        return np.array(Tokenizer.from_gguf(gguf).encode(DEFAULT_PROMPT), dtype=np.int64)
    except (UkgpuError, KeyError, ImportError, AttributeError):  # a synthetic model: no vocabulary
        return (np.arange(24, dtype=np.int64) * 37 + 1) % gguf.tensors["token_embd.weight"].shape[0]


def layer_checks(gguf: Any, backend: Any, ids: np.ndarray) -> list[Check]:
    from ukgpu.llama_core.cpu.backend import CpuBackend
    from ukgpu.llama_core.model import Model

    cpu, gpu = _Recording(CpuBackend(dtype=np.float64)), _Recording(backend)
    for be in (cpu, gpu):
        model = Model(gguf, be)
        model.forward(ids, 0, model.new_kv(len(ids)), all_logits=False)
    checks = []
    for i, (c, g) in enumerate(zip(cpu.blocks, gpu.blocks)):
        part = "attn" if i % 2 == 0 else "ffn"
        checks.append(nmse_check("layer", f"block {i // 2} {part} residual", g, c, LAYER_BOUND))
    if len(cpu.blocks) != len(gpu.blocks):
        checks.append(Check("layer", "block count", "exact", len(gpu.blocks), len(cpu.blocks), False))
    return checks


def e2e_checks(gguf: Any, backend: Any, ids: np.ndarray, n_generate: int) -> list[Check]:
    from ukgpu.llama_core.cpu.backend import CpuBackend
    from ukgpu.llama_core.model import Model

    cpu, gpu = Model(gguf, CpuBackend()), Model(gguf, backend)
    n_ctx = len(ids) + n_generate + 1
    ckv, gkv = cpu.new_kv(n_ctx), gpu.new_kv(n_ctx)
    c_logits, g_logits = cpu.forward(ids, 0, ckv), gpu.forward(ids, 0, gkv)
    checks = [nmse_check("e2e", f"prompt logits ({len(ids)} tokens)", g_logits, c_logits,
                         LOGITS_BOUND)]
    # a prefill that resumes after a cached prefix (the engine's prompt reuse): the first half
    # in one pass, the rest from its position on; the last logits must be the full pass's
    split = len(ids) // 2
    if split:
        rkv = gpu.new_kv(n_ctx)
        gpu.forward(ids[:split], 0, rkv, all_logits=False)
        resumed = gpu.forward(ids[split:], split, rkv, all_logits=False)
        checks.append(nmse_check("e2e", f"prefill resumed at token {split} (cached prefix)",
                                 resumed, c_logits[-1:], LOGITS_BOUND))
    token, pos, agree = int(np.argmax(c_logits[-1])), len(ids), 0
    for _ in range(n_generate):
        c_row = cpu.forward(np.array([token]), pos, ckv, all_logits=False)[0]
        g_next = backend.decode_greedy(gpu, token, pos, gkv)
        c_next = int(np.argmax(c_row))
        if g_next != c_next:
            ok, note = near_tie(c_row, c_next, g_next)
            return checks + [Check("e2e", "greedy continuation (graph decode)", "tokens", agree,
                                   n_generate, ok, f"diverged at token {agree}: {note}")]
        agree, token, pos = agree + 1, c_next, pos + 1
    return checks + [Check("e2e", "greedy continuation (graph decode)", "tokens", agree, n_generate,
                           True, "all tokens equal")]


def pdl_checks(gguf: Any, backend: Any, ids: np.ndarray, n_generate: int) -> list[Check]:
    """Prefill then n_generate graph-decoded steps, with PDL launches and again with plain ones
    (a new cache: a new capture): the logits must be the same bits.  Nothing where PDL is off."""
    from ukgpu.llama_core.model import Model

    ks = backend.kernels
    if not ks.pdl:
        return []
    gpu = Model(gguf, backend)

    def decode_rows() -> np.ndarray:
        kv = gpu.new_kv(len(ids) + n_generate + 1)
        token, rows = int(np.argmax(gpu.forward(ids, 0, kv, all_logits=False)[-1])), []
        for pos in range(len(ids), len(ids) + n_generate):
            rows.append(np.asarray(backend.decode(gpu, token, pos, kv)).reshape(-1))
            token = int(np.argmax(rows[-1]))
        return np.stack(rows)

    with_pdl = decode_rows()
    with ks.plain_launches("plain launches for verify's comparison"):
        plain = decode_rows()
    differ = np.flatnonzero((with_pdl != plain).any(axis=1))
    detail = ("every logit equal" if not len(differ) else
              f"{len(differ)} of {len(plain)} steps differ, first at step {differ[0]}")
    return [Check("e2e", f"graph decode with PDL = plain launches ({n_generate} steps)", "exact",
                  float(len(differ)), 0.0, not len(differ), detail)]


def near_tie(row: np.ndarray, cpu_token: int, gpu_token: int) -> tuple[bool, str]:
    """(excused, why): is the GPU's greedy pick within the near-tie margin of the CPU's on the
    CPU's logits `row`?  (NEAR_TIE_REL, NEAR_TIE_FLOOR: the derivation above.)"""
    row = np.asarray(row, dtype=np.float64)
    gap = float(row[cpu_token] - row[gpu_token])
    margin = max(NEAR_TIE_REL * float(row.max() - row.min()), NEAR_TIE_FLOOR)
    ok = gap < margin
    return ok, (f"CPU {cpu_token}, GPU {gpu_token}, CPU logit gap {gap:.3g} "
                f"{'<' if ok else '>='} near-tie margin {margin:.3g}" + ("; near tie" if ok else ""))


def _scratch_kernel_checks(kernels: Any, seed: int, guard: Guard) -> list[Check]:
    """`kernel_checks` on their own device arena (the backend's is sized for the model), freed
    after them."""
    from ukgpu.gpu.cuda.arena import DeviceArena
    from ukgpu.gpu.cuda.driver import CudaError

    scratch = DeviceArena(kernels.cu, KERNEL_SCRATCH_BYTES)
    try:
        return kernel_checks(kernels, scratch, seed, guard)
    finally:
        try:
            scratch.free()
        except CudaError:  # a lost context: the error is already reported
            pass


def _portable_ptx_checks(be: Any, seed: int, guard: Guard) -> list[Check]:
    """The same kernel checks through the portable PTX (driver JIT), which GPUs without a
    matching cubin run; skipped where the backend already runs that PTX."""
    from ukgpu.gpu.cuda.modules import KernelSet

    if all(k["kind"] == "ptx" for k in be.kernels.describe()):
        return []
    ptx = KernelSet(be.ctx, be.kernels.manifests, force_ptx=PORTABLE_TARGET)
    checks = _scratch_kernel_checks(ptx, seed, guard)
    for c in checks:
        c.name = f"{c.name} [{PORTABLE_TARGET} ptx]"
    return checks


def _gpu_line(info: Any) -> str:
    line = info.line()
    try:
        from ukgpu.gpu.pci.sysfs import PciBus, normalize_bdf

        dev = PciBus().device(normalize_bdf(info.pci_bus_id))
        return f"{line}; sysfs: {dev.vendor_name} {dev.device_name} driver={dev.driver}"
    except Exception:  # noqa: BLE001 - the sysfs line is a nicety (absent in some VMs)
        return line


def run_checks(opts: VerifyOptions, driver: Any = None) -> Report:
    from ukgpu.gpu.cuda.select import create_backend, probe

    ok, reason = probe(opts.device, driver)
    if not ok:
        return Report("no_gpu", "", f"no usable CUDA GPU ({reason}); checked instead: kernel "
                      "manifests and artifact hashes (no kernel, layer or e2e check ran)",
                      manifest_checks())
    gguf = None
    if opts.layers or opts.e2e:
        from ukgpu.llama_core.gguf.file import open_gguf
        from ukgpu.llama_core.models.registry import resolve_model

        gguf = open_gguf(resolve_model(opts.model))
    be = create_backend(opts.device, gguf, driver=driver, n_ctx=512)
    be.kernels.sync = True  # layer and e2e faults name their kernel too (graphs never wait)
    report, guard = Report(device=_gpu_line(be.ctx.info)), Guard()
    if opts.kernels:
        report.checks += guard.run("kernel", "kernel checks", _scratch_kernel_checks, be.kernels,
                                   opts.seed, guard)
        report.checks += guard.run("kernel", f"{PORTABLE_TARGET} ptx kernels", _portable_ptx_checks,
                                   be, opts.seed, guard)
    if gguf is not None:
        ids = _prompt_ids(gguf)
        if opts.layers:
            report.checks += guard.run("layer", "layer checks", layer_checks, gguf, be, ids)
        if opts.e2e:
            report.checks += guard.run("e2e", "e2e checks", e2e_checks, gguf, be, ids,
                                       opts.n_generate)
            report.checks += guard.run("e2e", "pdl checks", pdl_checks, gguf, be, ids,
                                       opts.n_generate)
    report.kernels_loaded = be.kernels.describe()
    report.status = "pass" if all(c.ok for c in report.checks) else "fail"
    return report


def table(report: Report) -> str:
    rows = [("level", "check", "metric", "value", "bound", "result")]
    for c in report.checks:
        value = f"{c.value:.3g}" if c.metric == "nmse" else "-" if c.metric == "not run" else str(c.value)
        rows.append((c.level, c.name, c.metric, value, f"{c.bound:g}", "ok" if c.ok else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    notes = [f"  {c.name}: {c.detail}" for c in report.checks if c.detail and not c.ok]
    return "\n".join(lines + notes)


def run(opts: VerifyOptions, driver: Any = None, out: Any = print) -> int:
    report = run_checks(opts, driver)
    for line in (report.device, report.message):
        if line:
            out(line)
    out(table(report))
    if opts.json_out is not None:
        Path(opts.json_out).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    n_bad = sum(not c.ok for c in report.checks)
    if report.status == "no_gpu":
        return EXIT_NO_GPU
    out(f"verify: {report.status} ({len(report.checks) - n_bad}/{len(report.checks)} checks pass)")
    return EXIT_OK if report.status == "pass" else EXIT_MISMATCH
