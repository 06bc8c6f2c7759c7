"""Synthetic models: the recorded specs match the real headers, and the built files load
in ukgpu and in llama.cpp with the real layout and sane random weights."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ukgpu.llama_core.gguf import synthetic
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.tools.bench.extract_shapes import read_header, spec_from_header

REF_PYTHON = Path(os.environ.get("UKGPU_REF_PYTHON", "/root/ref/venv/bin/python"))


def _layout(gguf) -> list[tuple[str, str, tuple]]:
    return [(t.name, t.qtype.name, tuple(t.shape)) for t in gguf.tensors.values()]


def _spec_layout(spec) -> list[tuple[str, str, tuple]]:
    return [(t["name"], t["type"], tuple(t["shape"])) for t in spec["tensors"]]


@pytest.mark.parametrize("shape, fixture", [("smollm2-135m", "smollm2"), ("qwen2.5-coder-0.5b", "qwen05")])
def test_committed_spec_is_the_real_header(shape, fixture, request):
    real = request.getfixturevalue(fixture)
    spec = synthetic.load_spec(shape)
    assert _spec_layout(spec) == _layout(real)
    values = {k: v["value"] for k, v in spec["metadata"].items()}
    assert values == {k: v for k, v in real.metadata.items() if k not in synthetic.TOKENIZER_ARRAYS}
    for key, want in spec["vocab"].items():
        assert want["length"] == len(real.metadata[key])
        assert want["sha256"] == synthetic.fingerprint(real.metadata[key])


def test_extraction_reads_a_header_prefix_only(smollm2_path):
    """The 1.5B spec came from a prefix of a split download: a prefix must give the same spec."""
    full = open(smollm2_path, "rb").read()
    whole = read_header(full)
    prefix = read_header(full[: whole["header_bytes"] + 16])
    assert prefix == whole
    assert spec_from_header("x", prefix, "s")["tensors"] == synthetic.load_spec("smollm2-135m")["tensors"]


def test_qwen_1_5b_spec_matches_its_recorded_header():
    spec = synthetic.load_spec("qwen2.5-coder-1.5b")
    md = {k: v["value"] for k, v in spec["metadata"].items()}
    assert md["general.architecture"] == "qwen2" and md["general.size_label"] == "1.5B"
    n_layers, d, ff = md["qwen2.block_count"], md["qwen2.embedding_length"], md["qwen2.feed_forward_length"]
    assert (n_layers, d, ff) == (28, 1536, 8960)
    kv_dim = d // md["qwen2.attention.head_count"] * md["qwen2.attention.head_count_kv"]
    tensors = {t["name"]: t for t in spec["tensors"]}
    assert len(tensors) == 3 + 12 * n_layers  # embd, output_norm, output + 12 per layer (q/k/v biases)
    assert Counter(t["type"] for t in spec["tensors"]) == {"Q4_K": 169, "F32": 141, "Q6_K": 29}
    for i in range(n_layers):
        assert tensors[f"blk.{i}.attn_q.weight"]["shape"] == [d, d]
        assert tensors[f"blk.{i}.attn_k.weight"]["shape"] == [kv_dim, d]
        assert tensors[f"blk.{i}.attn_k.bias"]["shape"] == [kv_dim]
        assert tensors[f"blk.{i}.ffn_down.weight"]["shape"] == [d, ff]
    assert tensors["token_embd.weight"]["shape"] == [151936, d]
    types = {k: v["type"] for k, v in spec["metadata"].items()}
    assert types["qwen2.block_count"] == "UINT32" and types["qwen2.rope.freq_base"] == "FLOAT32"
    # same vocabulary as the 0.5B, so its tokenizer is copied in
    assert spec["vocab"] == synthetic.load_spec("qwen2.5-coder-0.5b")["vocab"]


def test_unknown_shape_lists_the_known_ones():
    with pytest.raises(synthetic.SyntheticError, match="smollm2-135m"):
        synthetic.load_spec("gpt-5")


def test_a_spec_without_a_donor_gets_the_minimal_vocabulary():
    """Specs that are not real shapes (the test suite's tiny models) have no tokenizer donor."""
    spec = {"name": "tiny-x", "tensors": [{"name": "token_embd.weight", "type": "Q8_0", "shape": [300, 64]}]}
    vocab, source = synthetic.vocabulary(spec)
    assert source == "minimal" and len(vocab["tokenizer.ggml.tokens"][0]) == 300


def cut_to_layers(spec: dict, n_layers: int) -> dict:
    """The spec with only its first n_layers blocks (a small model for the slower checks)."""
    arch = spec["metadata"]["general.architecture"]["value"]
    small = json.loads(json.dumps(spec))
    small["metadata"][f"{arch}.block_count"]["value"] = n_layers
    small["tensors"] = [t for t in spec["tensors"]
                        if not t["name"].startswith("blk.") or int(t["name"].split(".")[1]) < n_layers]
    return small


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_path):
    """The smollm2 shape built in full with the donor's vocabulary (cached under a temporary
    UKGPU_CACHE), and a 2-layer cut of it with the minimal vocabulary."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("UKGPU_CACHE", str(cache))
    (cache / "models").mkdir()
    os.symlink(smollm2_path, cache / "models" / "smollm2-135m.gguf")
    donor = synthetic.build_synthetic("smollm2-135m", seed=3)
    stamp = donor.stat().st_mtime_ns
    again = synthetic.build_synthetic("smollm2-135m", seed=3)  # cached: not rebuilt
    (cache / "models" / "smollm2-135m.gguf").unlink()  # no donor now: the minimal vocabulary
    small_spec = cut_to_layers(synthetic.load_spec("smollm2-135m"), 2)
    minimal = cache / "minimal.gguf"
    synthetic.write_spec(small_spec, minimal, seed=3)
    yield {"donor": donor, "minimal": minimal, "again": again, "rebuilt": again.stat().st_mtime_ns != stamp}
    mp.undo()


def test_built_file_has_the_real_layout_and_metadata(built, smollm2):
    syn = open_gguf(built["donor"])
    assert _layout(syn) == _layout(smollm2)
    for key, value in smollm2.metadata.items():
        assert syn.metadata[key] == value, key  # tokenizer arrays included: copied from the donor
    assert "seed 3" in syn.metadata["general.source.synthetic"]
    assert built["again"] == built["donor"] and not built["rebuilt"]


def test_random_weights_are_sane_and_seeded(built, smollm2):
    syn = open_gguf(built["donor"])
    q = syn.tensors["blk.0.attn_q.weight"].dequantize()  # [576, 576] from Q4_1 blocks
    assert 0.015 < float(q.std()) < 0.025 and abs(float(q.mean())) < 2e-3
    norm = syn.tensors["blk.0.attn_norm.weight"].dequantize()
    assert np.all(np.abs(norm - 1.0) < 0.15)
    assert not np.array_equal(syn.tensors["blk.0.attn_q.weight"].data, smollm2.tensors["blk.0.attn_q.weight"].data)
    other = open_gguf(built["minimal"])  # same seed, other vocabulary, fewer layers: same first weights
    for name in ("token_embd.weight", "blk.1.ffn_down.weight"):
        assert np.array_equal(other.tensors[name].data, syn.tensors[name].data)
    assert "blk.2.attn_q.weight" not in other.tensors


def test_minimal_vocabulary_is_a_valid_byte_level_bpe(built):
    from ukgpu.llama_core.text.tokenizer import Tokenizer

    syn = open_gguf(built["minimal"])
    assert len(syn.metadata["tokenizer.ggml.tokens"]) == 49152
    tok = Tokenizer.from_gguf(syn)
    text = "hello world, synthetic ünïcode"
    ids = tok.encode(text, add_special=False)
    assert tok.decode(ids) == text
    assert max(ids) < 256 + 676  # bytes and letter-pair merges only


def test_ukgpu_runs_the_synthetic_model(built):
    from ukgpu.llama_core.cpu.backend import CpuBackend
    from ukgpu.llama_core.model import Model

    model = Model(open_gguf(built["minimal"]), CpuBackend())
    logits = model.forward(np.array([1, 2, 3]), 0, model.new_kv(8), all_logits=False)  # [1, vocab]
    assert logits.shape == (1, 49152) and np.all(np.isfinite(logits))


LLAMA_LOAD = """
import sys, llama_cpp
m = llama_cpp.llama.llama_cpp
base = m.llama_model_default_params
def params():
    p = base(); p.use_extra_bufts = False; return p
m.llama_model_default_params = params
llm = llama_cpp.Llama(sys.argv[1], n_ctx=32, n_batch=32, n_ubatch=32, n_threads=1, verbose=False)
ids = llm.tokenize(b"hello world", add_bos=False)
llm.eval(ids)
print(llm.n_vocab(), len(ids))
"""


def _llama_python() -> str:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    if REF_PYTHON.exists():
        return str(REF_PYTHON)
    pytest.skip(f"no interpreter with llama_cpp (this one lacks it and {REF_PYTHON} does not exist; "
                "set UKGPU_REF_PYTHON or pip install llama-cpp-python==0.3.36)")


@pytest.mark.parametrize("which", ["donor", "minimal"])
def test_llama_cpp_loads_and_runs_the_synthetic_model(built, which):
    done = subprocess.run([_llama_python(), "-c", LLAMA_LOAD, str(built[which])], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=""))
    assert done.returncode == 0, done.stderr[-2000:]
    n_vocab, n_ids = map(int, done.stdout.split())
    assert n_vocab == 49152 and n_ids >= 2


def test_family_layouts_are_specs_too(tmp_path):
    """The per-family layouts load by name, are listed in the unknown-shape error, and write
    given values (rope factors) exactly while the rest stays random and seeded."""
    from ukgpu.llama_core.gguf.family_specs import FAMILY_SPECS

    with pytest.raises(synthetic.SyntheticError, match="syn-gemma3"):
        synthetic.load_spec("syn-unknown")
    spec = synthetic.load_spec("syn-llama3")
    assert spec["name"] == "syn-llama3" and set(FAMILY_SPECS) >= {"syn-qwen3", "syn-gemma3", "syn-phi3"}
    paths = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for path in paths:
        synthetic.write_spec(spec, path, seed=5)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # (spec, seed) -> the same bytes
    freqs = next(t for t in spec["tensors"] if t["name"] == "rope_freqs.weight")
    got = open_gguf(paths[0]).tensors["rope_freqs.weight"].dequantize()
    assert np.array_equal(got, np.asarray(freqs["values"], dtype=np.float32)) and got.max() == 8.0
    bad = dict(spec, tensors=[dict(t, values=[1.0]) if t is freqs else t for t in spec["tensors"]])
    with pytest.raises(synthetic.SyntheticError, match="rope_freqs.weight"):
        synthetic.write_spec(bad, tmp_path / "c.gguf", seed=5)
