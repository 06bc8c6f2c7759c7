"""numba's cached kernels are dropped when any kernel source changed (`cpu.cache_stamp`): numba
itself only notices a change in the file that defines a function, not in a file it inlines."""

from __future__ import annotations

import shutil
from pathlib import Path

from ukgpu.llama_core.cpu import cache_stamp

CPU = Path(cache_stamp.__file__).parent


def _copy_sources(dst: Path) -> Path:
    (dst / "cpu").mkdir(parents=True)
    (dst / "gguf").mkdir()
    for name in cache_stamp.SOURCES:
        shutil.copyfile(CPU / name, dst / "cpu" / name)
    return dst / "cpu"


def test_the_digest_follows_every_source(tmp_path):
    folder = _copy_sources(tmp_path)
    first = cache_stamp.sources_digest(folder)
    assert first == cache_stamp.sources_digest(CPU)
    for name in ("int8_ir.py", "../gguf/quants.py"):  # inlined IR helpers; a function superblocks compiles
        path = folder / name
        path.write_bytes(path.read_bytes() + b"\n# changed\n")
        assert cache_stamp.sources_digest(folder) != first
        first = cache_stamp.sources_digest(folder)
    (folder / "int8_dot.py").unlink()
    assert cache_stamp.sources_digest(folder) is None  # unreadable: nothing is removed


def test_stale_kernel_files_go_and_the_rest_stays(tmp_path):
    kernel_files = ["int8_act._rows-110.py311.nbi", "int8_act._rows-110.py311.1.nbc", "decode_step._step-130.py311.nbi"]
    others = ["numpy_thing.f-1.py311.nbi", "int8_act.cpython-311.pyc"]
    for name in kernel_files + others:
        (tmp_path / name).write_bytes(b"x")
    assert cache_stamp.refresh_dir(tmp_path, cache_stamp.KERNEL_MODULES, "digest-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + [cache_stamp.STAMP])
    (tmp_path / kernel_files[0]).write_bytes(b"compiled again")  # same sources: the cache is kept
    assert not cache_stamp.refresh_dir(tmp_path, cache_stamp.KERNEL_MODULES, "digest-1")
    assert (tmp_path / kernel_files[0]).exists()
    assert cache_stamp.refresh_dir(tmp_path, cache_stamp.KERNEL_MODULES, "digest-2")  # sources changed
    assert not (tmp_path / kernel_files[0]).exists()
