"""GGUF loading, ggml quant formats, tokenizer and the CPU reference forward pass."""
