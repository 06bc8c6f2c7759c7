"""Fuzzing the GGUF parser: every mutated file opens cleanly or raises GGUFError.

Mutations are truncations, random byte overwrites and planted huge integers (the
length and count fields are where parsers go wrong), over the real SmolLM2 header
(its 98 MB of weights are a sparse hole, so opening stays cheap) and over a small
complete model written with gguf-py.  Each case runs under an alarm: a hang fails.
"""

from __future__ import annotations

import os
import resource
import struct

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit

from ukgpu.llama_core.errors import GGUFError
from ukgpu.llama_core.gguf.file import open_gguf

CASE_SECONDS = 10
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutations(size: int, hot: list[tuple[int, int]]):
    """(truncate_at or None, [(offset, bytes)]) with offsets biased towards `hot` ranges."""
    position = st.one_of(*(st.integers(lo, max(lo, hi - 1)) for lo, hi in hot), st.integers(0, size - 1))
    payload = st.one_of(
        st.binary(min_size=1, max_size=4),
        st.sampled_from([struct.pack("<Q", v) for v in (0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1)]),
        st.sampled_from([struct.pack("<I", v) for v in (0, 3, 8, 9, 12, 13, 255, 2**31)]),
    )
    edits = st.lists(st.tuples(position, payload), min_size=0, max_size=6)
    return st.tuples(st.one_of(st.none(), position), edits)


def mutate(data: bytes, case) -> bytes:
    truncate_at, edits = case
    buf = bytearray(data)
    for offset, payload in edits:
        buf[offset : offset + len(payload)] = payload[: max(0, len(buf) - offset)]
    return bytes(buf[:truncate_at] if truncate_at is not None else buf)


def check_opens_or_gguf_error(path, full_size: int | None = None) -> None:
    with time_limit(CASE_SECONDS):
        try:
            f = open_gguf(path)
        except GGUFError:
            return
        size = f.bytes.nbytes
        for view in f.tensors.values():  # every view lies inside the file
            start = view.data.ctypes.data - f.bytes.ctypes.data
            assert 0 <= start and start + view.data.nbytes <= size
        try:
            f.config
        except GGUFError:
            pass
        if full_size is None:  # small file: the data itself must decode too
            for view in f.tensors.values():
                with np.errstate(all="ignore"):
                    assert view.dequantize().shape == view.shape


@pytest.fixture(scope="module")
def smollm2_header(smollm2) -> tuple[bytes, int, int]:
    """(header bytes, tensor-info start, full file size)."""
    header = bytes(smollm2.mapping[: smollm2.data_offset])
    first_info = header.rfind(b"token_embd.weight") - 8
    return header, first_info, smollm2.bytes.nbytes


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "d\u00e9f"])
    w.add_array("tokenizer.ggml.token_type", [1, 2, 3])
    w.add_float32("llama.rope.freq_base", 1e4)
    w.add_bool("x.flag", True)
    w.add_tensor("w8", np.zeros((2, 34), np.uint8), raw_shape=(2, 34), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("n", np.arange(8, dtype=np.float32))
    w.add_tensor("h", np.ones((4, 8), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_fuzz_small_file(small_gguf, tmp_path):
    path = tmp_path / "case.gguf"
    hot = [(0, 64), (len(small_gguf) - 400, len(small_gguf) - 200)]
    path.write_bytes(small_gguf)  # unmutated it must be valid, or the test proves nothing
    assert set(open_gguf(path).tensors) == {"w8", "n", "h"}

    @FUZZ
    @given(mutations(len(small_gguf), hot))
    def run(case):
        path.write_bytes(mutate(small_gguf, case))
        check_opens_or_gguf_error(path)

    run()


def test_fuzz_smollm2_header(smollm2_header, tmp_path):
    header, first_info, full_size = smollm2_header
    path = tmp_path / "case.gguf"
    hot = [(0, 2048), (first_info, len(header))]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @FUZZ
    @given(mutations(len(header), hot))
    def run(case):
        data = mutate(header, case)
        with open(path, "wb") as out:
            out.write(data)
            if case[0] is None:
                out.truncate(full_size)  # the weights as a sparse hole
        check_opens_or_gguf_error(path, full_size)

    run()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 512 * 1024, f"peak memory grew by {grown_kib} KiB while fuzzing"


def test_sparse_copy_of_header_is_valid(smollm2_header, tmp_path):
    header, _, full_size = smollm2_header
    path = tmp_path / "copy.gguf"
    with open(path, "wb") as out:
        out.write(header)
        out.truncate(full_size)
    f = open_gguf(path)
    assert f.config.n_layers == 30 and os.path.getsize(path) == full_size
