"""With UKGPU_CUDA_STUB=DIR (and LD_LIBRARY_PATH=DIR), these tests run through cuda-python's real
bindings against the stand-in libcuda.so.1 of tests/cuda_stub instead of a GPU: every call form
is the real one, the device below the C ABI is the fake of tests/fakes/cuda_driver.py.  Tests that
measure the hardware (`hardware` marker) are skipped there with that reason."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

STUB = os.environ.get("UKGPU_CUDA_STUB")

if STUB:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cuda_stub"))
    from libcuda_stub import install

    STUB_DISPATCH = install(Path(STUB))


def pytest_configure(config):
    config.addinivalue_line("markers", "hardware: measures the GPU itself (timings); "
                            "meaningless on the stand-in driver")


def pytest_collection_modifyitems(config, items):
    if not STUB:
        return
    skip = pytest.mark.skip(reason="measures GPU hardware; this run uses the stand-in libcuda.so.1")
    for item in items:
        if "hardware" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_errors_inside_the_stub():
    """An exception below the bindings fails the test that caused it."""
    yield
    if STUB and STUB_DISPATCH.errors:
        errors, STUB_DISPATCH.errors[:] = list(STUB_DISPATCH.errors), []
        pytest.fail(f"{len(errors)} error(s) inside the libcuda stub:\n" + errors[0])
