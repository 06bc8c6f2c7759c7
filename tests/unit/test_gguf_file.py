"""GGUF parsing: metadata and tensor views agree with gguf-py, zero copy, config, errors."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ukgpu.llama_core.errors import GGUFError
from ukgpu.llama_core.gguf import quants
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.models.config import expected_shapes

DIM, FFN, VOCAB, HEADS, KV_HEADS = 64, 96, 128, 4, 2


def write_tiny_llama(path, arch="llama", qtype=T.Q8_0, drop_key=None, extra=None, tied=True, seed=0):
    """A small random-weight model of the given arch; returns {name: float32 weights}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        f"{arch}.block_count": (2, "uint32"), f"{arch}.context_length": (256, "uint32"),
        f"{arch}.embedding_length": (DIM, "uint32"), f"{arch}.feed_forward_length": (FFN, "uint32"),
        f"{arch}.attention.head_count": (HEADS, "uint32"), f"{arch}.attention.head_count_kv": (KV_HEADS, "uint32"),
        f"{arch}.rope.freq_base": (10000.0, "float32"), f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, "float32"),
    }
    for key, (value, kind) in keys.items():
        if key != drop_key:
            getattr(w, f"add_{kind}")(key, value)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(VOCAB)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(VOCAB)])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("general.name", "tiny \u00e9\u6f22")
    w.add_int64("test.negative", -(1 << 40))
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    weights = {}
    head_dim = DIM // HEADS
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, DIM)
    for i in range(2):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (DIM,), p + "ffn_norm.weight": (DIM,),
                   p + "attn_q.weight": (HEADS * head_dim, DIM), p + "attn_k.weight": (KV_HEADS * head_dim, DIM),
                   p + "attn_v.weight": (KV_HEADS * head_dim, DIM), p + "attn_output.weight": (DIM, DIM),
                   p + "ffn_gate.weight": (FFN, DIM), p + "ffn_up.weight": (FFN, DIM), p + "ffn_down.weight": (DIM, FFN)}
        if arch == "qwen2":
            shapes |= {p + "attn_q.bias": (DIM,), p + "attn_k.bias": (KV_HEADS * head_dim,), p + "attn_v.bias": (KV_HEADS * head_dim,)}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(name, x)
            weights[name] = x
        else:
            raw = quants.quantize(x, qtype)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            weights[name] = quants.dequantize(raw.reshape(-1), qtype, x.size).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_metadata_and_tensors_match_gguf_reader(smollm2, smollm2_path):
    reader = gguf.GGUFReader(smollm2_path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert smollm2.metadata == expected
    assert isinstance(smollm2.metadata["tokenizer.ggml.tokens"][0], str)
    assert len(smollm2.tensors) == len(reader.tensors) == 272
    for t in reader.tensors:
        view = smollm2.tensors[t.name]
        assert view.qtype == t.tensor_type
        assert view.shape == tuple(reversed(t.shape.tolist()))
        assert view.data.nbytes == t.n_bytes
        assert view.data.dtype == np.uint8 and view.data.ndim == 1
        assert view.data.ctypes.data - smollm2.bytes.ctypes.data == t.data_offset


def test_views_are_zero_copy_and_read_only(smollm2):
    view = smollm2.tensors["blk.3.ffn_up.weight"]
    assert np.shares_memory(view.data, smollm2.bytes)
    assert not view.data.flags.writeable
    base = view.data
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and base.obj is smollm2.mapping  # ends at the mmap
    rows = view.rows()
    assert rows.shape == (1536, 576 // 32 * 20) and np.shares_memory(rows, view.data)


def test_open_does_not_read_the_weights(qwen05_path):
    """RSS grows by the header's worth, not by the 491 MB of weights."""
    code = (
        "import sys; from ukgpu.llama_core.gguf.file import open_gguf\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "before = rss(); g = open_gguf(sys.argv[1]); g.config; print(rss() - before, g.bytes.nbytes)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(qwen05_path)], capture_output=True, text=True, check=True)
    grown, size = map(int, out.stdout.split())
    assert size > 400e6 and grown < 100e6, (grown, size)


def test_real_configs(smollm2, qwen05):
    s = smollm2.config
    assert (s.arch, s.n_layers, s.dim, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim) == ("llama", 30, 576, 9, 3, 64, 1536)
    assert (s.vocab_size, s.ctx_len, s.rope_base, s.rope_style) == (49152, 8192, 100000.0, "norm")
    assert s.tied_embeddings and s.output == "token_embd.weight" and not s.has_qkv_bias
    assert s.rms_eps == pytest.approx(1e-5) and s.rope_scaling is None
    q = qwen05.config
    assert (q.arch, q.n_layers, q.dim, q.n_heads, q.n_kv_heads, q.head_dim, q.ffn_dim) == ("qwen2", 24, 896, 14, 2, 64, 4864)
    assert (q.vocab_size, q.ctx_len, q.rope_base, q.rope_style) == (151936, 32768, 1e6, "neox")
    assert q.has_qkv_bias and not q.tied_embeddings and q.output == "output.weight"
    assert q.rms_eps == pytest.approx(1e-6)
    for f in (smollm2, qwen05):
        assert set(expected_shapes(f.config)) <= set(f.tensors)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_written_model_round_trips(tmp_path, arch):
    path = tmp_path / "tiny.gguf"
    weights = write_tiny_llama(path, arch=arch, tied=arch == "llama")
    f = open_gguf(path)
    assert f.metadata["general.name"] == "tiny \u00e9\u6f22"
    assert f.metadata["tokenizer.ggml.tokens"][5] == "tok5"
    assert f.metadata["tokenizer.ggml.scores"][7] == 7.0
    assert f.metadata["tokenizer.ggml.add_bos_token"] is True
    assert f.metadata["test.negative"] == -(1 << 40)
    cfg = f.config
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.head_dim, cfg.vocab_size) == (arch, 2, DIM, DIM // HEADS, VOCAB)
    assert cfg.has_qkv_bias == (arch == "qwen2") and cfg.tied_embeddings == (arch == "llama")
    for name, expected in weights.items():
        assert np.array_equal(f.tensors[name].dequantize(), expected), name


def test_unsupported_arch_names_key(tmp_path):
    path = tmp_path / "gpt.gguf"
    write_tiny_llama(path, arch="gpt2")
    with pytest.raises(GGUFError, match=r"architecture 'gpt2' \(general.architecture\) is not supported"):
        open_gguf(path).config


def test_missing_key_names_key_and_file(tmp_path):
    path = tmp_path / "nokey.gguf"
    write_tiny_llama(path, drop_key="llama.feed_forward_length")
    with pytest.raises(GGUFError, match="llama.feed_forward_length") as err:
        open_gguf(path).config
    assert str(path) in str(err.value)


def test_wrong_key_type(tmp_path):
    path = tmp_path / "badtype.gguf"
    write_tiny_llama(path, drop_key="llama.block_count", extra={"llama.block_count": "two"})
    with pytest.raises(GGUFError, match="'llama.block_count' should be int"):
        open_gguf(path).config


def test_not_gguf_truncated_and_missing(tmp_path):
    (tmp_path / "text.gguf").write_bytes(b"hello world, this is not a model file at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_gguf(tmp_path / "text.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="too short"):
        open_gguf(tmp_path / "empty.gguf")
    with pytest.raises(GGUFError, match="cannot open"):
        open_gguf(tmp_path / "absent.gguf")
    full = tmp_path / "full.gguf"
    write_tiny_llama(full)
    data = full.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(GGUFError, match="runs past the end of the file"):
        open_gguf(tmp_path / "cut.gguf")


def test_missing_tensor_is_named(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_llama(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"blk.1.ffn_up.weight")
    data[at : at + 5] = b"blk.9"  # same length: the file stays well-formed
    path.write_bytes(data)
    with pytest.raises(GGUFError, match="'blk.1.ffn_up.weight' is missing"):
        open_gguf(path).config


def test_block_device_size_comes_from_seeking_to_the_end(tmp_path, monkeypatch):
    """A model disk in the VM is a block device: st_size is 0 there, the real size is at SEEK_END."""
    import os
    import stat as stat_mod

    from ukgpu.llama_core.gguf import file as gguf_file

    p = tmp_path / "disk.bin"
    p.write_bytes(b"\0" * 4096)
    real_fstat = os.fstat

    def blk_fstat(fd):
        st = real_fstat(fd)
        return os.stat_result((stat_mod.S_IFBLK | 0o600,) + tuple(st)[1:6] + (0,) + tuple(st)[7:])

    monkeypatch.setattr(gguf_file.os, "fstat", blk_fstat)
    with open(p, "rb") as f:
        assert gguf_file._byte_size(f) == 4096


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_release_pages_drops_a_tensor_from_rss_and_keeps_its_bytes(smollm2_path):
    """Backends that repack a weight release the mapped original; reading it again still works."""
    from ukgpu.llama_core.gguf.file import TensorView

    g = open_gguf(smollm2_path)
    view = g.tensors["token_embd.weight"]  # ~26 MB
    checksum = int(view.data.sum(dtype=np.uint64))  # faults every page in
    before = _rss_kib()
    assert view.release_pages()
    dropped = before - _rss_kib()
    assert dropped > 0.8 * view.data.nbytes / 1024, f"only {dropped} KiB left the resident set"
    assert int(view.data.sum(dtype=np.uint64)) == checksum
    owned = TensorView("w", view.qtype, (4,), np.zeros(4 * 18, dtype=np.uint8))
    assert not owned.release_pages()  # never on memory that is not a read-only file mapping
    assert not owned.data.any()


def test_string_arrays_iterate_like_indexing(smollm2):
    tokens = smollm2.metadata["tokenizer.ggml.tokens"]
    assert list(tokens) == [tokens[i] for i in range(len(tokens))]


def test_lazy_gguf_package_loads_the_rest_when_asked():
    """The guest's `import gguf` skips gguf-py's __init__ until a name beyond the quant types
    and submodules is used; then everything is there and the enums are the same objects."""
    code = (
        "import sys\n"
        "from ukgpu.kernel.guest.engine_setup import lazy_gguf_package\n"
        "lazy_gguf_package()\n"
        "from gguf import GGMLQuantizationType as T\n"
        "from gguf import quants\n"
        "assert 'gguf.gguf_writer' not in sys.modules and 'gguf.metadata' not in sys.modules\n"
        "import gguf, gguf.constants\n"
        "assert T is gguf.constants.GGMLQuantizationType and quants is gguf.quants\n"
        "assert gguf.GGUFWriter and gguf.GGUFReader and gguf.GGMLQuantizationType is T\n"
        "assert 'gguf.metadata' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
