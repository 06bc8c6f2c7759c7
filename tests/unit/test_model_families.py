"""Every model family against llama.cpp, on random-weight files of the family's exact layout.

`syn-*` specs (`llama_core/gguf/family_specs.py`) are written by the one synthetic writer from
(spec, seed); tests/data/golden/syn-*.npz is llama.cpp 0.3.36 on that file's F32 dequantization
(tools/dev/golden_logits.py).  The file is rebuilt here and must hash to the golden's sha256
(same bytes as the ones llama.cpp ran), then the float64 CPU backend must give logits within
1e-3 of each row's largest at every prompt position, the same argmax everywhere and the same
greedy continuation; the float32 CPU backend's one-token decode path must generate the same 32
tokens.  Measured: ~3e-7 for the llama, qwen3 and phi3 layouts; 2e-4 for gemma3 (whose GELU the
CPU backend rounds to half precision as llama.cpp's table does; exact GELU would give 5e-4).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ukgpu.llama_core.cpu.backend import CpuBackend
from ukgpu.llama_core.gguf import synthetic
from ukgpu.llama_core.gguf.family_specs import FAMILY_SPECS
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.model import Model

GOLDEN = Path(__file__).parents[1] / "data" / "golden"
REL_TOL = 1e-3
N_DECODE = 32


def _golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per row: max|ours - ref| / max|ref|."""
    return np.abs(ours - ref).max(axis=-1) / np.abs(ref).max(axis=-1)


class Family:
    """A family's rebuilt file, its golden data and one batched float64 forward of prompt +
    greedy continuation (teacher forcing)."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path, self.ref = name, path, _golden(name)
        synthetic.write_spec(synthetic.load_spec(name), path, int(self.ref["seed"]))
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.model = Model(open_gguf(path), CpuBackend(dtype=np.float64))
        ids = np.concatenate([self.ref["prompt_ids"], self.ref["greedy_ids"][:-1]])  # [127]
        self.logits = self.model.forward(ids, 0, self.model.new_kv(len(ids) + 9))  # [127, vocab]


@pytest.fixture(scope="module", params=sorted(FAMILY_SPECS))
def family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp("families") / f"{request.param}.gguf")


def test_rebuilt_file_is_the_one_llama_cpp_ran(family: Family):
    assert family.sha256 == str(family.ref["model_sha256"]), \
        f"{family.name}: the synthetic writer no longer writes the golden's bytes; regenerate the golden"


def test_full_logit_rows_match(family: Family):
    ref = family.ref
    errs = _rel_err(family.logits[ref["full_pos"]], ref["full_logits"])
    assert errs.max() <= REL_TOL, dict(zip(ref["full_pos"].tolist(), errs.tolist()))


def test_top16_logits_match_at_every_prompt_position(family: Family):
    ref = family.ref
    ours = np.take_along_axis(family.logits[:64], ref["topk_ids"], axis=1)  # [64, 16]
    errs = _rel_err(ours, ref["topk_vals"])
    assert errs.max() <= REL_TOL, f"worst position {errs.argmax()}: {errs.max():.2e}"


def test_argmax_identical_at_every_position(family: Family):
    ref = family.ref
    expected = np.concatenate([ref["topk_ids"][:, 0], ref["greedy_ids"][1:]])
    assert np.array_equal(family.logits.argmax(axis=1), expected)


def test_greedy_continuation_identical(family: Family):
    ref = family.ref
    assert family.logits[63:].argmax(axis=1).tolist() == ref["greedy_ids"].tolist()


def test_decode_path_generates_the_greedy_tokens(family: Family):
    """float32 CPU backend, prefill then one token at a time through the KV cache (the
    numba decode attention, windowed on gemma3's local layers)."""
    model = Model(open_gguf(family.path), CpuBackend())
    ref, kv = family.ref, model.new_kv(64 + N_DECODE + 8)
    prompt = ref["prompt_ids"]
    token = int(np.argmax(model.forward(prompt, 0, kv, all_logits=False)[-1]))
    out = [token]
    for step in range(N_DECODE - 1):
        token = model.backend.decode_greedy(model, token, len(prompt) + step, kv)
        out.append(token)
    assert out == ref["greedy_ids"][:N_DECODE].tolist()


def test_each_spec_carries_what_its_family_adds(family: Family):
    c = family.model.config
    assert c.arch == str(family.model.gguf.metadata["general.architecture"])
    local = [c.is_local(i) for i in range(c.n_layers)]
    features = {"syn-llama3": c.rope_freqs is not None,
                "syn-llama-yarn": c.rope_scaling is not None and c.rope_scaling.type == "yarn",
                "syn-mistral": c.n_heads == 4 * c.n_kv_heads and not c.tied_embeddings,
                "syn-qwen3": c.family.qk_norm and c.n_heads * c.head_dim != c.dim,
                "syn-gemma3": 0 < c.sliding_window < 64 and any(local) and not all(local),
                "syn-phi3": c.fused_qkv and c.fused_up and c.rope_factors is not None}
    assert features[family.name]


@pytest.mark.parametrize("name, change", [
    ("syn-gemma3", {"sliding_window": 25}),  # one key more in the window
    ("syn-gemma3", {"rope_base_local": 1e6}),  # local layers with the global base
    ("syn-llama3", {"rope_freqs": None}),  # without llama3's frequency divisors
    ("syn-phi3", {"rope_scaling": None}),  # without the attention factor
])
def test_without_a_family_part_the_logits_leave_the_tolerance(name, change, tmp_path):
    """The comparisons above can fail: dropping or shifting one family part moves the logits
    far beyond the tolerance."""
    import dataclasses

    from ukgpu.llama_core.layers import RopeTable

    ref = _golden(name)
    path = tmp_path / f"{name}.gguf"
    synthetic.write_spec(synthetic.load_spec(name), path, int(ref["seed"]))
    model = Model(open_gguf(path), CpuBackend(dtype=np.float64))
    model.config = dataclasses.replace(model.config, **change)
    model.ropes = RopeTable(_With(model.gguf, model.config))  # type: ignore[arg-type]
    logits = model.forward(ref["prompt_ids"], 0, model.new_kv(136))
    assert _rel_err(logits[ref["full_pos"]], ref["full_logits"]).max() > 10 * REL_TOL


class _With:
    """A GGUF file seen with another config (for the rope table of a changed model)."""

    def __init__(self, gguf, config) -> None:
        self.tensors, self.config = gguf.tensors, config


def test_batched_decode_step_matches_one_sequence_at_a_time(family: Family):
    """`forward_batch` (two sequences at different positions, past gemma3's window) gives each
    sequence's own one-token logits."""
    model, prompt = family.model, family.ref["prompt_ids"]
    kvs = [model.new_kv(64), model.new_kv(64)]
    lens = [40, 57]
    for kv, n in zip(kvs, lens):
        model.forward(prompt[:n], 0, kv, all_logits=False)
    tokens = np.array([prompt[40], prompt[57]])
    batched = model.forward_batch(tokens, lens, kvs)  # [2, vocab]
    for b, n in enumerate(lens):
        kv = model.new_kv(64)
        single = model.forward(prompt[:n + 1], 0, kv)[-1]
        assert _rel_err(batched[b], single) < 1e-9
