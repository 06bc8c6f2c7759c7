"""Decode as a captured CUDA graph, replayed once per token.

The first decode step of a (model, KV cache) pair runs eagerly: it gives that step's logits and
loads every kernel decode needs.  Then the model's own `forward` is run once more with the
backend in capture mode (`cuStreamBeginCapture` .. `cuStreamEndCapture`): ops read the token,
position and key count from the backend's `StepBuffers` instead of uploading them, `to_host`
names the logits buffer instead of copying it, and an argmax kernel is appended.  The graph is
instantiated once; each later step is one 64-byte upload of the step words, one `cuGraphLaunch`,
and one download (4 bytes for greedy, the logits row otherwise): no per-kernel Python launches.

What a backend and `Model.forward` must keep true for this to be valid (no host syncs or reads
while recording, no shape or branch that depends on the token or position) is the capture
contract in `ukgpu.llama_core.backend`.  This module imports nothing of the backend: it drives
the `CudaBackend` through its `ctx`, `cu`, `capturing`, `captured_output`, `step` (the
`StepBuffers` defined here), `argmax`, `to_host` and `kernels` (a capture refused for its
programmatic dependent launches is recorded again with plain ones).

A capture the driver or the backend refuses (a non-sticky `CudaError`, or a `UkgpuError` such as
`CudaUnsupported` raised while recording) is ended and any graph it produced destroyed; decode
then runs eagerly on the GPU (`model.forward` per token, one launch per kernel: slower, same
numbers) for every later step of this backend, said once on stderr and kept in `eager_reason`.
Per backend rather than per KV cache: every cache records the same forward, so a refusal would
repeat for the next cache, costing a failed capture and a line per request.  A sticky error (the
context is lost) is raised: nothing on this GPU can run any more.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ukgpu.gpu.cuda.arena import DeviceBuffer
from ukgpu.gpu.cuda.driver import CudaError
from ukgpu.llama_core.errors import UkgpuError

# calls by which a driver that cannot record programmatic launches into a graph refuses them
PDL_REFUSALS = frozenset({"cuLaunchKernelEx", "cuStreamEndCapture", "cuGraphInstantiate"})


@dataclass
class StepBuffers:
    """int32 device words a recorded decode step reads each replay: int32[8] each of token ids,
    positions, key counts, cache slots and slab rows (slot * n_ctx + position), one per batch
    row (one row for a single sequence, whose cache is its own slot 0)."""

    IDS, POS, LENS, SLOT, ROWS = 0, 32, 64, 96, 128  # byte offsets (16-byte aligned)
    NBYTES = 160
    base: int

    @property
    def ids(self) -> int:
        return self.base + self.IDS

    @property
    def pos(self) -> int:
        return self.base + self.POS

    @property
    def lens(self) -> int:
        return self.base + self.LENS

    @property
    def slot(self) -> int:
        return self.base + self.SLOT

    @property
    def rows(self) -> int:
        return self.base + self.ROWS

    @classmethod
    def batch_words(cls, tokens: Any, positions: Any, slots: Any, n_ctx: int) -> np.ndarray:
        """The words of one step of len(tokens) <= 8 rows."""
        w = np.zeros(cls.NBYTES // 4, dtype=np.int32)
        b = len(tokens)
        pos, slot = np.asarray(positions, dtype=np.int64), np.asarray(slots, dtype=np.int64)
        w[0:b] = np.asarray(tokens, dtype=np.int64)
        w[8:8 + b], w[16:16 + b], w[24:24 + b] = pos, pos + 1, slot
        w[32:32 + b] = slot * n_ctx + pos
        return w

    @classmethod
    def words(cls, token: int, pos: int) -> np.ndarray:
        """One sequence (its own cache, slot 0)."""
        return cls.batch_words([token], [pos], [0], 0)


@dataclass
class DecodeGraph:
    exec: Any
    logits: DeviceBuffer  # float32[1, vocab], written by every replay
    token: DeviceBuffer | None  # int32[1], argmax of logits (single-sequence graphs)
    replays: int = 0


class DecodeGraphs:
    """The captured decode graph of each (model, KV cache) pair of one `CudaBackend`."""

    def __init__(self, backend: Any):
        self.be = backend
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.batch_graphs: dict[tuple[int, int, int], DecodeGraph] = {}  # (model, slab, B)
        self.captures = 0
        self.eager_reason = ""  # why decode runs eagerly (a refused capture); "" while graphs do

    def step(self, model: Any, token: int, pos: int, kv: Any, greedy: bool) -> Any:
        key = (id(model), id(kv))
        graph = self.graphs.get(key)
        if graph is not None:
            return self.replay(graph, token, pos, kv, greedy)
        logits = model.forward(np.array([token]), pos, kv, all_logits=False)  # eager (warm-up)
        if not self.eager_reason:
            graph = self._try_capture(lambda: self.capture(model, kv))
            if graph is not None:
                self.graphs[key] = graph
                for owner in (kv, model):  # its memory / id may be reused: drop the graph with it
                    weakref.finalize(owner, self._forget, key)
        return int(np.argmax(logits[0])) if greedy else logits

    def step_batch(self, model: Any, tokens: np.ndarray, positions: list[int], kvs: list[Any]) -> Any:
        """Logits [B, vocab] of one step of B sequences: replayed from the (model, slab, B)
        graph when their caches share a slab (`kv_slab`), else `model.forward_batch` eagerly.
        The first step of each batch size runs eagerly and records the graph."""
        slab = kvs[0].k.slab
        if slab is None or any(kv.k.slab is not slab for kv in kvs):
            return model.forward_batch(tokens, positions, kvs)
        key = (id(model), id(slab), len(kvs))
        graph = self.batch_graphs.get(key)
        if graph is not None:
            return self.replay_batch(graph, tokens, positions, kvs)
        logits = model.forward_batch(tokens, positions, kvs)  # eager (warm-up)
        if not self.eager_reason:
            graph = self._try_capture(lambda: self.capture_batch(model, kvs))
            if graph is not None:
                self.batch_graphs[key] = graph
                weakref.finalize(model, self._forget, key)  # the slab lives as long as the backend
        return logits

    def _try_capture(self, record: Any) -> DecodeGraph | None:
        """The captured graph, or None after a refusal (decode is eager from then on).  A refused
        PDL launch, or graph of them, is recorded once more without PDL (`_without_pdl`)."""
        try:
            return record()
        except CudaError as exc:
            if exc.sticky:
                raise
            graph, exc = self._without_pdl(record, exc)
            if graph is not None:
                return graph
            reason = str(exc)
        except UkgpuError as exc:  # the backend refused an op while recording
            reason = f"{type(exc).__name__}: {exc}"
        self.eager_reason = f"decode graph capture refused ({reason}); decoding eagerly"
        print(f"ukgpu: {self.eager_reason} on the GPU (one launch per kernel, slower) from now "
              "on", file=sys.stderr)
        return None

    def _without_pdl(self, record: Any, exc: CudaError) -> tuple[DecodeGraph | None, CudaError]:
        """After a refused capture of PDL launches: record again without PDL.  When that works
        the attribute was the cause and PDL stays off; when it fails too it was not: PDL stays
        on and the refusal without it is the one reported."""
        kernels = self.be.kernels
        if not kernels.pdl or exc.call not in PDL_REFUSALS:
            return None, exc
        try:
            with kernels.plain_launches("suspended for a capture"):
                graph = record()
        except CudaError as again:
            if again.sticky:
                raise
            return None, again
        except UkgpuError:
            return None, exc
        kernels.disable_pdl(f"decode graph capture refused: {exc}")
        return graph, exc

    def capture(self, model: Any, kv: Any) -> DecodeGraph:
        be = self.be

        def run() -> tuple[DeviceBuffer, DeviceBuffer]:
            model.forward(np.zeros(1, dtype=np.int64), 0, kv, all_logits=False)
            logits = be.captured_output
            return logits, be.argmax(logits)
        return self._record(run)

    def capture_batch(self, model: Any, kvs: list[Any]) -> DecodeGraph:
        """Record `model.forward_batch` over the caches' slab: rows read token, position, slot
        from the step buffers, so the graph serves any B sequences of that slab."""
        def run() -> tuple[DeviceBuffer, None]:
            model.forward_batch(np.zeros(len(kvs), dtype=np.int64), [0] * len(kvs), kvs)
            return self.be.captured_output, None
        return self._record(run)

    def _record(self, run: Any) -> DecodeGraph:
        be, cu = self.be, self.be.cu
        stream = be.ctx.stream
        be.ctx.ensure_current()
        be.ctx.sync()
        cu.cuStreamBeginCapture(stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        be.capturing, be.captured_output = True, None
        try:
            logits, token = run()
        except BaseException:
            be.capturing = False
            self._abandon(stream)
            raise
        be.capturing = False
        graph = cu.cuStreamEndCapture(stream)
        try:
            exec_ = cu.cuGraphInstantiate(graph, 0)
        finally:
            cu.cuGraphDestroy(graph)
        self.captures += 1
        return DecodeGraph(exec_, logits, token)

    def _abandon(self, stream: Any) -> None:
        """End a failed capture so the stream is usable again, destroying the graph the driver
        returns when the capture itself was still valid (the failure was ours); the cause of
        the failure propagates, so errors here are dropped."""
        cu = self.be.cu
        try:
            graph = cu.cuStreamEndCapture(stream)
        except CudaError:  # invalidated by the refused call: no graph was made
            return
        try:
            cu.cuGraphDestroy(graph)
        except CudaError:
            pass

    def replay(self, graph: DecodeGraph, token: int, pos: int, kv: Any, greedy: bool) -> Any:
        be, cu = self.be, self.be.cu
        if not 0 <= pos < kv.n_ctx:
            from ukgpu.llama_core.model import ContextOverflowError

            raise ContextOverflowError(f"position {pos} does not fit a {kv.n_ctx}-token KV "
                                       "cache; shorten the input or raise n_ctx")
        be.ctx.ensure_current()
        words = StepBuffers.words(token, pos)
        cu.cuMemcpyHtoDAsync(be.step.base, words.ctypes.data, words.nbytes, be.ctx.stream)
        cu.cuGraphLaunch(graph.exec, be.ctx.stream)
        graph.replays += 1
        if greedy:
            return int(be.to_host(graph.token)[0])
        return be.to_host(graph.logits)

    def replay_batch(self, graph: DecodeGraph, tokens: np.ndarray, positions: list[int],
                     kvs: list[Any]) -> np.ndarray:
        be, cu = self.be, self.be.cu
        n_ctx = kvs[0].n_ctx
        for pos in positions:
            if not 0 <= pos < n_ctx:
                from ukgpu.llama_core.model import ContextOverflowError

                raise ContextOverflowError(f"position {pos} does not fit a {n_ctx}-token KV "
                                           "cache; shorten the input or raise n_ctx")
        be.ctx.ensure_current()
        words = StepBuffers.batch_words(tokens, positions, [kv.k.slot for kv in kvs], n_ctx)
        cu.cuMemcpyHtoDAsync(be.step.base, words.ctypes.data, words.nbytes, be.ctx.stream)
        cu.cuGraphLaunch(graph.exec, be.ctx.stream)
        graph.replays += 1
        return be.to_host(graph.logits)

    def _forget(self, key: tuple) -> None:
        """Finalizer of a KV cache (or model): its graph goes too (nothing to do once the
        context is lost: the driver freed everything with it)."""
        graph = self.graphs.pop(key, None) or self.batch_graphs.pop(key, None)  # type: ignore[call-overload]
        if graph is not None:
            try:
                self.be.cu.cuGraphExecDestroy(graph.exec)
            except CudaError:
                pass

    def release(self) -> None:
        for graph in [*self.graphs.values(), *self.batch_graphs.values()]:
            self.be.cu.cuGraphExecDestroy(graph.exec)
        self.graphs.clear()
        self.batch_graphs.clear()
