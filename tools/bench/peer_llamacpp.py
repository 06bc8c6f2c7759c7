"""llama.cpp timings through llama-cpp-python, run by whichever interpreter has it.

This file is executed as a script (`PYTHON peer_llamacpp.py < request.json`) by
an interpreter that may not have ukgpu installed, so it imports only the
standard library, numpy and llama_cpp.  It times exactly what `backend_run`
times: pp = one `eval` of the prompt ids into an empty cache, ttft = that plus
picking the first token from the last logits, tg = n_gen single-token `eval`s
from an empty cache; one warm-up, then the repeats.  Layers go to the GPU as the
request says (n_gpu_layers: 0 = all on the CPU, -1 = every layer offloaded); with
none offloaded, a GPU build is also kept from sending prompt matmuls to the GPU
(op_offload off), so the CPU peer measures the CPU.  It prints one JSON object:
{"version", "n_threads", "n_gpu_layers", "op_offload", "gpu_offload", "system_info", "pp": [s...],
"ttft": [s...], "tg": [s...], "peak_rss_mib"}, where gpu_offload and system_info
are what this llama.cpp reports about its GPU support and backends.

llama.cpp is kept off its extra (repacked / AMX) weight buffers: on CPUs that
advertise AMX inside a VM that does not grant the tile state, that path
segfaults.  The plain CPU kernels are what it then measures.
"""

import inspect
import json
import resource
import sys
import time


def plain_weight_buffers(llama_cpp) -> None:
    """Make every model load with use_extra_bufts = False."""
    module = llama_cpp.llama.llama_cpp
    original = module.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params


def placement(llama_cpp, n_gpu_layers: int) -> dict:
    """Llama() keyword arguments that put the layers where the request asks."""
    kwargs = {"n_gpu_layers": n_gpu_layers}
    if n_gpu_layers == 0 and "op_offload" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        kwargs["op_offload"] = False
    return kwargs


def main() -> int:
    req = json.load(sys.stdin)  # {"model", "prompt": [ids], "n_gen", "repeats", "warmup", "n_threads", "n_gpu_layers"}
    import llama_cpp
    import numpy as np

    plain_weight_buffers(llama_cpp)
    prompt = [int(t) for t in req["prompt"]]
    n_ctx = max(len(prompt), req["n_gen"]) + 1
    where = placement(llama_cpp, int(req.get("n_gpu_layers", 0)))
    llm = llama_cpp.Llama(req["model"], n_ctx=n_ctx, n_batch=max(len(prompt), 1), n_ubatch=max(len(prompt), 1),
                          n_threads=req["n_threads"], n_threads_batch=req["n_threads"], verbose=False, **where)
    n_vocab = llm.n_vocab()
    pp, ttft, tg = [], [], []
    for i in range(req["warmup"] + req["repeats"]):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))  # last position
        int(np.argmax(logits))
        t2 = time.perf_counter()
        llm.reset()
        t3 = time.perf_counter()
        for pos in range(req["n_gen"]):
            llm.eval([prompt[pos % len(prompt)]])
        t4 = time.perf_counter()
        if i >= req["warmup"]:
            pp.append(t1 - t0)
            ttft.append(t2 - t0)
            tg.append(t4 - t3)
        print(f"llama.cpp run {i + 1}/{req['warmup'] + req['repeats']}", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"version": llama_cpp.__version__, "n_threads": req["n_threads"],
                      "n_gpu_layers": where["n_gpu_layers"], "op_offload": where.get("op_offload"),
                      "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                      "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
                      "pp": pp, "ttft": ttft, "tg": tg, "peak_rss_mib": peak, "extra_weight_buffers": False}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
