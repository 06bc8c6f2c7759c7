"""Small random-weight layouts of each supported family, for checking the forward pass against
llama.cpp (`synthetic.write_spec` writes them; tests/data/golden holds llama.cpp's logits).

Each spec carries the family's exact tensor names, shapes and metadata keys as llama.cpp's
converter writes them, at small sizes (width 256, a vocabulary of 512):

    syn-llama3      llama, GQA, rope_freqs.weight (llama3 frequency divisors), base 500000
    syn-llama-yarn  llama, rope scaling type yarn (factor 4 over an original context of 32)
    syn-mistral     llama as Mistral files carry it: GQA 8/2, base 1e6, separate output
    syn-qwen3       qwen3: per-head q/k norms, head size 128 (q width 512 over d 256), tied
    syn-gemma3      gemma3: 6 layers (5 local with a window of 24 < the 64-token prompt, 1
                    global), q/k norms, post-norms, GELU gate, sqrt(d) embedding scale, tied
    syn-phi3        phi3: fused attn_qkv and ffn_up, long/short rope factors (long ones in use
                    above an original context of 64) and rope.scaling.attn_factor

Weights are random (std 0.02, norms near 1) in a mix of quant types; a tensor's "values"
(rope factors) are written as given.  general.name avoids family names on purpose: llama.cpp
sets per-token attributes by model name ("phi3" in it makes it look up "</s>", which the
minimal vocabulary lacks, and fail to load).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

D, FF, VOCAB = 256, 512, 512
_TYPES = {"embd": "Q8_0", "q": "Q4_K", "k": "Q8_0", "v": "Q6_K", "o": "Q4_K", "gate": "Q5_0",
          "up": "Q4_K", "down": "Q6_K", "output": "Q8_0", "qkv": "Q8_0"}


def _v(value: Any, gguf_type: str) -> dict[str, Any]:
    return {"type": gguf_type, "sub_type": None, "value": value}


def _metadata(arch: str, n_layers: int, heads: tuple[int, int], ctx: int, base: float, eps: float,
              extra: dict[str, tuple[Any, str]]) -> dict[str, dict[str, Any]]:
    ints = {"block_count": n_layers, "context_length": ctx, "embedding_length": D, "feed_forward_length": FF,
            "attention.head_count": heads[0], "attention.head_count_kv": heads[1]}
    md = {"general.architecture": _v(arch, "STRING"), "general.name": _v("random-weight test model", "STRING"),
          **{f"{arch}.{k}": _v(v, "UINT32") for k, v in ints.items()},
          f"{arch}.rope.freq_base": _v(base, "FLOAT32"),
          f"{arch}.attention.layer_norm_rms_epsilon": _v(eps, "FLOAT32")}
    md |= {f"{arch}.{k}": _v(v, t) for k, (v, t) in extra.items()}
    return md | {"general.file_type": _v(7, "UINT32"), "tokenizer.ggml.model": _v("gpt2", "STRING"),
                 "tokenizer.ggml.eos_token_id": _v(VOCAB - 1, "UINT32")}


def _t(name: str, qtype: str, shape: list[int], values: list[float] | None = None) -> dict[str, Any]:
    return {"name": name, "type": qtype, "shape": shape, **({"values": values} if values is not None else {})}


def _layers(n_layers: int, heads: tuple[int, int], hd: int, *, fused: bool = False,
            qk_norm: bool = False, post_norms: bool = False) -> list[dict[str, Any]]:
    t, q_w, kv_w = _TYPES, heads[0] * hd, heads[1] * hd
    out = []
    for i in range(n_layers):
        p = f"blk.{i}."
        out.append(_t(p + "attn_norm.weight", "F32", [D]))
        if fused:
            out.append(_t(p + "attn_qkv.weight", t["qkv"], [q_w + 2 * kv_w, D]))
        else:
            out += [_t(p + "attn_q.weight", t["q"], [q_w, D]), _t(p + "attn_k.weight", t["k"], [kv_w, D]),
                    _t(p + "attn_v.weight", t["v"], [kv_w, D])]
        if qk_norm:
            out += [_t(p + "attn_q_norm.weight", "F32", [hd]), _t(p + "attn_k_norm.weight", "F32", [hd])]
        out.append(_t(p + "attn_output.weight", t["o"], [D, q_w]))
        if post_norms:
            out.append(_t(p + "post_attention_norm.weight", "F32", [D]))
        out.append(_t(p + "ffn_norm.weight", "F32", [D]))
        if fused:
            out.append(_t(p + "ffn_up.weight", t["up"], [2 * FF, D]))
        else:
            out += [_t(p + "ffn_gate.weight", t["gate"], [FF, D]), _t(p + "ffn_up.weight", t["up"], [FF, D])]
        out.append(_t(p + "ffn_down.weight", t["down"], [D, FF]))
        if post_norms:
            out.append(_t(p + "post_ffw_norm.weight", "F32", [D]))
    return out


def _model(name: str, md: dict[str, Any], layers: list[dict[str, Any]], tied: bool,
           extra: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    tensors = [_t("token_embd.weight", _TYPES["embd"], [VOCAB, D]), *extra, *layers,
               _t("output_norm.weight", "F32", [D])]
    if not tied:
        tensors.append(_t("output.weight", _TYPES["output"], [VOCAB, D]))
    return {"name": name, "source": f"the {name} test layout", "metadata": md, "tensors": tensors}


def llama3_factors(n_rot: int, base: float, factor: float, low: float, high: float, orig_ctx: int) -> list[float]:
    """Llama 3's rope frequency divisors (the published rope_scaling "llama3" rule)."""
    out = []
    for i in range(0, n_rot, 2):
        wavelen = 2 * math.pi * base ** (i / n_rot)
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def syn_llama3() -> dict[str, Any]:
    heads, hd = (4, 2), 64
    md = _metadata("llama", 3, heads, 8192, 500000.0, 1e-5, {"rope.dimension_count": (hd, "UINT32"),
                                                            "vocab_size": (VOCAB, "UINT32")})
    freqs = _t("rope_freqs.weight", "F32", [hd // 2], llama3_factors(hd, 500000.0, 8.0, 1.0, 4.0, 64))
    return _model("syn-llama3", md, _layers(3, heads, hd), tied=False, extra=(freqs,))


def syn_llama_yarn() -> dict[str, Any]:
    heads, hd = (4, 4), 64
    md = _metadata("llama", 2, heads, 128, 10000.0, 1e-5, {
        "rope.dimension_count": (hd, "UINT32"), "rope.scaling.type": ("yarn", "STRING"),
        "rope.scaling.factor": (4.0, "FLOAT32"), "rope.scaling.original_context_length": (32, "UINT32")})
    return _model("syn-llama-yarn", md, _layers(2, heads, hd), tied=True)


def syn_mistral() -> dict[str, Any]:
    heads, hd = (8, 2), 32
    md = _metadata("llama", 2, heads, 32768, 1e6, 1e-5, {"rope.dimension_count": (hd, "UINT32"),
                                                        "vocab_size": (VOCAB, "UINT32")})
    return _model("syn-mistral", md, _layers(2, heads, hd), tied=False)


def syn_qwen3() -> dict[str, Any]:
    heads, hd = (4, 2), 128
    md = _metadata("qwen3", 3, heads, 40960, 1e6, 1e-6, {"attention.key_length": (hd, "UINT32"),
                                                        "attention.value_length": (hd, "UINT32")})
    return _model("syn-qwen3", md, _layers(3, heads, hd, qk_norm=True), tied=True)


def syn_gemma3() -> dict[str, Any]:
    heads, hd = (4, 1), 128
    md = _metadata("gemma3", 6, heads, 32768, 1e6, 1e-6, {
        "attention.key_length": (hd, "UINT32"), "attention.value_length": (hd, "UINT32"),
        "attention.sliding_window": (24, "UINT32")})
    return _model("syn-gemma3", md, _layers(6, heads, hd, qk_norm=True, post_norms=True), tied=True)


def syn_phi3() -> dict[str, Any]:
    heads, hd = (4, 4), 64
    md = _metadata("phi3", 2, heads, 4096, 10000.0, 1e-5, {
        "rope.dimension_count": (hd, "UINT32"), "rope.scaling.original_context_length": (64, "UINT32"),
        "rope.scaling.attn_factor": (1.1902380714238083, "FLOAT32"), "attention.sliding_window": (2047, "UINT32")})
    half = hd // 2
    long = _t("rope_factors_long.weight", "F32", [half], [1.0 + 15.0 * (i / (half - 1)) ** 2 for i in range(half)])
    short = _t("rope_factors_short.weight", "F32", [half], [1.0 + 0.1 * i / (half - 1) for i in range(half)])
    return _model("syn-phi3", md, _layers(2, heads, hd, fused=True), tied=False, extra=(long, short))


FAMILY_SPECS: dict[str, Callable[[], dict[str, Any]]] = {
    "syn-llama3": syn_llama3, "syn-llama-yarn": syn_llama_yarn, "syn-mistral": syn_mistral,
    "syn-qwen3": syn_qwen3, "syn-gemma3": syn_gemma3, "syn-phi3": syn_phi3,
}
