"""Runs everything one `ukgpu bench` invocation asked for and assembles the Report."""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ukgpu.tools.bench import backend_run, kernels, machine, peers
from ukgpu.tools.bench.backend_run import RunConfig
from ukgpu.tools.bench.image_run import bench_image
from ukgpu.tools.bench.schema import Entry, Report


@dataclass
class BenchRequest:
    models: list[str] = field(default_factory=list)  # names or paths
    synthetic: list[str] = field(default_factory=list)  # shape names
    backends: list[str] = field(default_factory=lambda: ["cpu"])
    peers: list[str] = field(default_factory=list)
    peer_python: str | None = None  # interpreter whose llama_cpp the peers use
    llama_bench: str | None = None  # llama-bench binary the peers use (else PATH)
    run: RunConfig = field(default_factory=RunConfig)
    kernels: bool = True
    kernel_rows: int = 32  # n of the prefill-slab matmul in the kernel tests
    image: Path | None = None
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))


def _targets(req: BenchRequest) -> list[tuple[str, Path]]:
    from ukgpu.llama_core.gguf.synthetic import build_synthetic
    from ukgpu.llama_core.models.registry import resolve_model

    found = [(str(m), resolve_model(m)) for m in req.models]
    found += [(f"synthetic:{s}", build_synthetic(s, seed=req.run.seed, progress=True)) for s in req.synthetic]
    return found


def run(req: BenchRequest, argv: list[str]) -> Report:
    load_before = os.getloadavg()
    git = machine.git_state()  # the code as it was when the measurements started
    entries: list[Entry] = []
    targets = _targets(req)
    peer_tools = {p: _find_peer(p, req) for p in req.peers}
    steps = [(name, path, kind, who) for name, path in targets
             for kind, who in [("backend", b) for b in req.backends] + [("peer", p) for p in req.peers]]
    for name, path, kind, who in tqdm(steps, desc="ukgpu bench", unit="run", file=sys.stderr):
        entries.append(_one(req, name, path, kind, who, peer_tools))
    if req.kernels and targets:
        entries += _kernel_entries(req, targets)
    if req.image is not None:
        entries.append(bench_image(req.image, req.run.repeats))
    config = asdict(req.run) | {"threads": req.threads, "kernel_rows": req.kernel_rows,
                                "load_average_before": load_before, "load_average_after": os.getloadavg()}
    return Report(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  command=shlex.join(["ukgpu", *argv]), git=git,
                  machine=machine.machine_info(), versions=_versions(entries), config=config, entries=entries)


def _find_peer(name: str, req: BenchRequest) -> peers.PeerTool | str:
    """How to run peer `name` on its device, or why it cannot run."""
    if name not in peers.PEER_DEVICE:
        return f"unknown peer {name!r} (known: {', '.join(peers.PEER_DEVICE)})"
    return peers.find_llamacpp(peers.PEER_DEVICE[name], req.peer_python, req.llama_bench)


def _one(req: BenchRequest, name: str, path: Path, kind: str, who: str, peer_tools: dict) -> Entry:
    if kind == "backend":
        reason = backend_run.backend_unavailable(who)
        if reason:
            return Entry.unavailable(name, who, "backend", reason)
        return backend_run.run_in_child(path, name, who, req.run, req.threads)
    tool = peer_tools[who]
    if isinstance(tool, str):
        return Entry.unavailable(name, who, "peer", tool)
    return peers.run_llamacpp(tool, path, name, _vocab_size(path), req.run, req.threads)


def _vocab_size(path: Path) -> int:
    from ukgpu.llama_core.gguf.file import open_gguf

    return int(open_gguf(path).tensors["token_embd.weight"].shape[0])


def _kernel_entries(req: BenchRequest, targets: list[tuple[str, Path]]) -> list[Entry]:
    import numba

    from ukgpu.llama_core.gguf.file import open_gguf

    numba.set_num_threads(min(req.threads, numba.config.NUMBA_NUM_THREADS))  # -t, as in the children
    out = []
    for backend in req.backends:
        reason = backend_run.backend_unavailable(backend)
        if reason:
            out.append(Entry.unavailable("-", backend, "ceilings", reason))
            out += [Entry.unavailable(name, backend, "kernels", reason) for name, _ in targets]
            continue
        ceilings = kernels.cpu_ceilings if backend.startswith("cpu") else kernels.cuda_ceilings
        out.append(ceilings(req.run.repeats))
        for name, path in tqdm(targets, desc=f"kernels {backend}", unit="model", file=sys.stderr):
            gguf = open_gguf(path)
            be = backend_run.make_backend(backend, gguf)
            out.append(kernels.bench_kernels(gguf, name, be, backend, req.run.repeats, req.kernel_rows))
    return out


def _versions(entries: list[Entry]) -> dict:
    """Package versions, plus each llama.cpp peer's: "llama_cpp" (CPU) and "llama_cpp_cuda"."""
    found = machine.versions()
    for name in peers.PEER_DEVICE:
        key = name.replace("llamacpp", "llama_cpp").replace("-", "_")
        found[key] = next((e.info.get("version") for e in entries if e.runner == name and e.available), None)
    return found
