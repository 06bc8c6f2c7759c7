"""GGUF files: the memory-mapped reader, the ggml quant formats, the synthetic-model writer."""
