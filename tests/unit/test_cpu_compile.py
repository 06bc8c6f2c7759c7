"""llama_core.cpu.compile: telling a cold numba cache from a warm one, and saying so on a first run."""

from __future__ import annotations

import importlib.util
import io
import sys

import pytest

from ukgpu.llama_core.cpu import compile as cpu_compile
from ukgpu.llama_core.cpu import matmul

pytestmark = pytest.mark.skipif(not matmul.numba_enabled(), reason="numba is not installed")

SOURCE = """
from numba import njit

@njit(cache=True)
def twice(x):
    return 2 * x
"""


def _fresh_module(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(SOURCE)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_cache_state_follows_numba_index(tmp_path):
    module = _fresh_module(tmp_path, "ukgpu_cache_probe")
    try:
        assert not cpu_compile.has_cached_code(module.twice)
        assert module.twice(21) == 42
        assert cpu_compile.has_cached_code(module.twice)
        for index in (tmp_path / "__pycache__").glob("*.nbi"):
            index.unlink()  # a cleared cache is cold again
        assert not cpu_compile.has_cached_code(module.twice)
    finally:
        sys.modules.pop("ukgpu_cache_probe", None)


def test_every_kernel_is_cached_after_compiling():
    cpu_compile.compile_kernels()
    missing = [d.__name__ for d in cpu_compile._dispatchers() if not cpu_compile.has_cached_code(d)]
    assert missing == []
    assert cpu_compile.cached()


def test_first_run_says_it_compiles(monkeypatch):
    monkeypatch.setattr(cpu_compile, "cached", lambda: False)
    out = io.StringIO()
    cpu_compile.ensure_compiled(out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ukgpu: compiling the CPU kernels")
    assert lines[1].startswith("ukgpu: CPU kernels compiled in ")


def test_warm_run_is_quiet(monkeypatch):
    monkeypatch.setattr(cpu_compile, "cached", lambda: True)
    out = io.StringIO()
    cpu_compile.ensure_compiled(out)
    assert out.getvalue() == ""
