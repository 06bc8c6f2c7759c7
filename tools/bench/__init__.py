"""`ukgpu bench` and `ukgpu dashboard`: measurement, the versioned results file, the HTML report.

stats      median and spread of repeated samples
schema     the results file (schema_version, machine, versions, entries) and its validation
machine    what the numbers were measured on (CPU, memory, OS, GPU, versions, git commit)
cpu_run    prefill/decode/TTFT of a ukgpu backend on one model (Model.forward, like llama-bench)
kernels    per-matmul time and achieved GB/s / TFLOP/s against ceilings measured in the same run
peers      llama.cpp through llama-cpp-python (any interpreter) or a `llama-bench` binary
peer_llamacpp  the standalone script the peer interpreter runs (stdlib + llama_cpp only)
image_run  boot-to-READY of a built image
runner     runs everything the command line asked for into one Report
charts, html   the self-contained dashboard (inline SVG, no network at view time)
"""
