"""Predicted pp512 / tg128 of the CUDA backend on an H200, from the stand-in's launch trace.

    .venv/bin/python tests/perf/predict_cuda.py [--json out.json]
                     [--models smollm2-135m qwen2.5-coder-1.5b]

No GPU: the CUDA backend runs on the stand-in driver with `emulate=False` (every launch is
checked and recorded, nothing is computed) over the random-weight GGUFs of the real shapes
(`llama_core.gguf.synthetic`: SmolLM2-135M, Qwen2.5-Coder-1.5B Q4_K_M), as tests/perf/bench_cuda.py
runs them on hardware.  `tools/bench/cost_model.py` turns each recorded node into seconds.

- pp512: one eager forward of 512 prompt tokens (the engine's chunked prefill: one 512-row pass),
  last-position logits; time = max(device time, host launch time).
- tg128: 128 greedy steps from position 0, each a graph replay; each step's nodes are costed
  right after it ran, while the device words hold that step's key counts; time per step = device
  time of its nodes + the host's per-replay cost.
- batch-4 decode: one replayed step of four sequences (`Backend.decode_batch`), plus the
  download of their four logits rows at 25 GB/s; tokens per second over the four.
- nodes per layer (prefill pass and decode step), HBM bytes per decode token vs the GGUF's bytes,
  and the prefill time under each GEMM precision option of issue 15 (the choice is recorded in
  docs/benchmarks/cuda.md).
- tg128 again with the kernels the H200 profile measured priced by their laws
  (`cost_model.MEASURED_H200`, and `PREDICTED_H200` for the split-K down projection and the
  normed output row until they are measured): the figure to predict a change of node count or
  bytes with; the analytic figure is 3.5x optimistic about today's mat-vecs (docs/benchmarks/cuda.md).
- tg128 once more with the one-row mat-vecs priced by `cost_model.ROW_DOT_H200` (round trips to
  memory a step: the barrier-free loop of ptx_kernels/row_dot.py, a prediction until measured).
- and that with programmatic dependent launch (ptx_kernels/pdl.py): every node after a step's
  first overlaps its launch with the node before by `PDL_OVERLAP_S` (low, middle, high), the
  step's node count taken from the trace.  A prediction until the sweep's `no-pdl` run measures it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the stand-in driver

from ukgpu.gpu.cuda.select import create_backend  # noqa: E402
from ukgpu.llama_core.gguf.file import open_gguf  # noqa: E402
from ukgpu.llama_core.gguf.synthetic import build_synthetic  # noqa: E402
from ukgpu.llama_core.model import Model  # noqa: E402
from ukgpu.tools.bench import cost_model as cm  # noqa: E402

from fakes.cuda_driver import FakeDevice, FakeDriver  # noqa: E402

MODELS = ("smollm2-135m", "qwen2.5-coder-1.5b")
N_PROMPT, N_GEN = 512, 128
BATCH = 4  # sequences of the batched decode prediction
ROW_DOT_LAWS = cm.ROW_DOT_H200 | cm.MEASURED_H200 | cm.PREDICTED_H200
REPLAY_HOST_S = 20e-6  # per decode step: token/position upload, cuGraphLaunch, sync, 4-byte read
DTOH_BYTES_S = 25e9  # a batched step downloads B logits rows (the engine samples on the host)
# What PDL hides of each dependent node, a prediction: the launch and CTA dispatch of a node
# overlap the drain of the one before; its first load still waits (griddepcontrol.wait comes
# first).  Middle: llama.cpp's +13% decode from PDL on Hopper, at ~1.74 ms a token (1.5B Q4_K_M)
# over its ~14 nodes a layer (28 layers), is ~0.6 us a node; low and high: 0.4 and 1.0 us (the
# 1.5-2.5 us a node of graph chains of empty kernels bounds what any overlap could take).
PDL_OVERLAP_S = (0.4e-6, 0.6e-6, 1.0e-6)


def _setup(name: str) -> tuple[Model, Any, FakeDriver, int]:
    path = build_synthetic(name)
    gguf = open_gguf(path)
    fake = FakeDriver(devices=[FakeDevice(name="NVIDIA H200 (stand-in)", total_bytes=141 << 30)],
                      emulate=False)
    be = create_backend(gguf=gguf, driver=fake, n_ctx=N_PROMPT + N_GEN + 8, n_slots=BATCH)
    return Model(gguf, be), be, fake, path.stat().st_size


def predict_model(name: str, dev: cm.Device = cm.H200) -> dict[str, Any]:
    model, be, fake, gguf_bytes = _setup(name)
    n_layers = model.config.n_layers
    read = lambda ptr, n: fake.view(ptr, np.int32, n).tolist()  # noqa: E731
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, N_PROMPT)
    fake.trace.clear()
    model.forward(prompt, 0, model.new_kv(N_PROMPT + 8), all_logits=False)
    pp_trace = list(fake.trace)
    pp = cm.predict(pp_trace, dev, graph=False, read_i32=read)
    pp_s = cm.eager_seconds(pp, dev)
    kv, token = model.new_kv(N_GEN + 8), int(prompt[0])
    be.decode_greedy(model, token, 0, kv)  # eager step + capture (a warm-up on hardware too)
    steps: list[cm.Prediction] = []
    measured_s = 0.0  # the same steps priced by the laws measured on an H200 (cm.MEASURED_H200;
    # the kernels of issue 18 by the laws predicted for them, cm.PREDICTED_H200)
    row_dot_s = 0.0  # and with the one-row mat-vecs of ptx_kernels/row_dot.py by cm.ROW_DOT_H200
    dependent = 0  # nodes of the steps that follow another node of their step (PDL overlaps them)
    for pos in range(N_GEN):
        fake.trace.clear()
        token = be.decode_greedy(model, token, pos, kv) % model.config.vocab_size
        steps.append(cm.predict(fake.trace, dev, graph=True, read_i32=read))
        measured_s += cm.predict(fake.trace, dev, graph=True, read_i32=read,
                                 measured=cm.MEASURED_H200 | cm.PREDICTED_H200).device_s + REPLAY_HOST_S
        row_dot_s += cm.predict(fake.trace, dev, graph=True, read_i32=read,
                                measured=ROW_DOT_LAWS).device_s + REPLAY_HOST_S
        dependent += len(fake.trace) - 1
    tg_s = sum(p.device_s + REPLAY_HOST_S for p in steps)
    batch = _batch_step(model, be, fake, read, BATCH)
    options = cm.gemm_options(pp_trace, dev, graph=False, read_i32=read)
    return {
        "model": name, "device": dev.name, "gguf_mb": round(gguf_bytes / 1e6, 1),
        f"pp{N_PROMPT}_tps": round(N_PROMPT / pp_s, 1), f"tg{N_GEN}_tps": round(N_GEN / tg_s, 1),
        f"tg{N_GEN}_tps_measured_laws": round(N_GEN / measured_s, 1),
        f"tg{N_GEN}_tps_row_dot_laws": round(N_GEN / row_dot_s, 1),
        f"tg{N_GEN}_tps_row_dot_laws_pdl": [round(N_GEN / (row_dot_s - dependent * o), 1) for o in PDL_OVERLAP_S],
        "prefill": {**cm.summary(pp), "host_ms": round(len(pp.nodes) * dev.host_launch_s * 1e3, 3),
                    "nodes_per_layer": round(len(pp.nodes) / n_layers, 2)},
        "decode_step": {**cm.summary(steps[-1]), "nodes_per_layer": round(len(steps[-1].nodes) / n_layers, 2),
                        "hbm_bytes_per_token_vs_gguf": round(steps[-1].bytes / gguf_bytes, 3)},
        f"tg_batch{BATCH}_tps": round(BATCH / (batch.device_s + REPLAY_HOST_S
                                               + BATCH * model.config.vocab_size * 4 / DTOH_BYTES_S), 1),
        f"decode_step_batch{BATCH}": {**cm.summary(batch), "nodes_per_layer": round(len(batch.nodes) / n_layers, 2)},
        f"pp{N_PROMPT}_tps_by_gemm_option": {k: round(N_PROMPT / max(v, len(pp.nodes) * dev.host_launch_s), 1)
                                             for k, v in options.items()},
        f"pp{N_PROMPT}_device_ms_by_gemm_option": {k: round(v * 1e3, 3) for k, v in options.items()},
    }


def _batch_step(model: Model, be: Any, fake: FakeDriver, read: Any, b: int) -> cm.Prediction:
    """One replayed decode step of b sequences at position N_GEN // 2 (the engine's slots
    decoding together: `Backend.decode_batch`), costed as a graph."""
    kvs = [model.new_kv(N_GEN + 16) for _ in range(b)]  # a slab of their own (another shape)
    tokens = np.arange(1, b + 1)
    be.decode_batch(model, tokens, [N_GEN // 2] * b, kvs)  # eager step + capture
    fake.trace.clear()
    be.decode_batch(model, tokens, [N_GEN // 2 + 1] * b, kvs)
    return cm.predict(fake.trace, cm.H200, graph=True, read_i32=read)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results = [predict_model(name) for name in args.models]
    for r in results:
        print(json.dumps(r, indent=1))
    print(f"\n| shape | pp{N_PROMPT} t/s | tg{N_GEN} t/s | tg{N_GEN} t/s, H200 laws | tg{N_GEN} t/s, row-dot law "
          f"| tg{N_GEN} t/s, row-dot law + PDL (low-high) "
          f"| batch-{BATCH} decode t/s | prefill nodes/layer | decode nodes/layer | decode HBM bytes / GGUF bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r[f'pp{N_PROMPT}_tps']:,.0f} | {r[f'tg{N_GEN}_tps']:,.0f} "
              f"| {r[f'tg{N_GEN}_tps_measured_laws']:,.0f} | {r[f'tg{N_GEN}_tps_row_dot_laws']:,.0f} "
              f"| {r[f'tg{N_GEN}_tps_row_dot_laws_pdl'][1]:,.0f} ({r[f'tg{N_GEN}_tps_row_dot_laws_pdl'][0]:,.0f}"
              f"-{r[f'tg{N_GEN}_tps_row_dot_laws_pdl'][2]:,.0f}) "
              f"| {r[f'tg_batch{BATCH}_tps']:,.0f} | {r['prefill']['nodes_per_layer']} "
              f"| {r['decode_step']['nodes_per_layer']} | {r['decode_step']['hbm_bytes_per_token_vs_gguf']} |")
    if args.json:
        args.json.write_text(json.dumps({"predictions": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
