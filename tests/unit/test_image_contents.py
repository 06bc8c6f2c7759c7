"""The image's ukgpu files: the guest's import closure and its data, and no host-only module.

The layout is the one the image builder stages (`python_layout.ukgpu_layout`),
so these checks need neither QEMU nor the Debian packages.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ukgpu.kernel.image import build as image_build
from ukgpu.kernel.image import guest_closure
from ukgpu.kernel.image import python_layout as image_python
from ukgpu.kernel.image import stage as image_stage

REPO = image_build.REPO
PREFIX = f"{image_python.SITE}/ukgpu/"
# Host side only: building and booting images, generating and checking kernels, VFIO host setup, CLI.
# ptx_kernels/spec.py ships: pure Python (no Triton), it holds the one table of compiled head sizes
# that the guest's loader picks kernels from.
HOST_ONLY = ("kernel/image/*", "ptx_kernels/generate.py", "ptx_kernels/check.py",
             "ptx_kernels/catalog.py", "ptx_kernels/attention.py",
             "ptx_kernels/dequant.py", "ptx_kernels/elementwise.py", "ptx_kernels/embedding.py",
             "ptx_kernels/gemm.py", "ptx_kernels/matvec.py", "ptx_kernels/rmsnorm.py",
             "ptx_kernels/rope.py", "gpu/vfio/host.py", "gpu/vfio/passthrough.py", "tools/*")


@pytest.fixture(scope="module")
def image_files() -> set[str]:
    """The ukgpu files of the image, relative to the package root, as the builder lays them out."""
    files = image_python.ukgpu_layout(REPO).files
    assert all(guest.startswith(PREFIX) for guest in files)
    return {guest.removeprefix(PREFIX) for guest in files}


@pytest.fixture(scope="module")
def closure() -> dict[str, Path]:
    return guest_closure.import_closure(REPO)


def test_the_image_holds_the_guest_import_closure_and_the_kernel_artifacts(image_files, closure):
    sources = {path.relative_to(REPO).as_posix() for path in closure.values()}
    assert {f for f in image_files if f.endswith(".py")} == sources
    artifacts = {p.relative_to(REPO).as_posix() for p in (REPO / "ptx_kernels" / "build").rglob("*")
                 if p.is_file()}
    assert artifacts, "ptx_kernels/build/ is empty"
    assert image_files - sources == artifacts
    assert "ukgpu.kernel.guest.init" in closure
    assert {"ukgpu.gpu.cuda.backend", "ukgpu.llama_core.cpu.superblocks"} <= set(closure), \
        "the lazily imported CUDA backend and numba kernels must ship"


def test_no_host_only_module_is_in_the_image(image_files):
    for pattern in HOST_ONLY:
        assert list(REPO.glob(pattern)), f"{pattern} matches nothing: update HOST_ONLY"
        shipped = fnmatch.filter(image_files, pattern)
        assert not shipped, f"host-only files in the image: {shipped}"


def _ukgpu_imports(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return {n for n in names if n.startswith("ukgpu.")}


def test_what_the_build_imports_in_the_chroot_ships(closure):
    checked = {m for m in image_build.GUEST_IMPORTS if m.startswith("ukgpu.")}
    warmed = _ukgpu_imports(image_stage._WARM)
    assert checked and warmed
    assert checked | warmed <= set(closure)


_IMPORT_ALL = r"""
import importlib, json, sys
wanted = json.loads(sys.argv[1])
for name in wanted:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("ukgpu."))))
"""


def test_importing_the_closure_needs_nothing_outside_it(closure):
    """Python's own view: loading every guest module pulls in no other ukgpu module."""
    res = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(list(closure))],
                         capture_output=True, text=True, check=True, timeout=300)
    assert set(json.loads(res.stdout)) - set(closure) == set()


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_closure_rules(tmp_path):
    repo = _tree(tmp_path, {
        "app/__init__.py": "",
        "app/main.py": "from . import helper\nfrom .pkg import thing, mod\n"
                       "def later():\n    import ukgpu.other.deep.leaf\n",
        "app/helper.py": "import json\nfrom ..other import shared\n",
        "app/host.py": "import ukgpu.app.main\n",
        "app/pkg/__init__.py": "thing = 1\n",
        "app/pkg/mod.py": "from ukgpu.app.pkg import thing\n",
        "other/__init__.py": "from ukgpu.other.shared import X\n",
        "other/shared.py": "X = 1\n",
        "other/deep/__init__.py": "",
        "other/deep/leaf.py": "",
        "other/unused.py": "",
    })
    closure = guest_closure.import_closure(repo, "ukgpu.app.main")
    assert sorted(closure) == ["ukgpu.app", "ukgpu.app.helper", "ukgpu.app.main", "ukgpu.app.pkg",
                               "ukgpu.app.pkg.mod", "ukgpu.other", "ukgpu.other.deep",
                               "ukgpu.other.deep.leaf", "ukgpu.other.shared"]
    assert closure["ukgpu.app.pkg"] == repo / "app/pkg/__init__.py"


def test_a_guest_import_of_a_missing_module_is_an_error(tmp_path):
    repo = _tree(tmp_path, {"app/__init__.py": "", "app/main.py": "def f():\n    import ukgpu.app.gone\n"})
    with pytest.raises(guest_closure.GuestClosureError, match="ukgpu.app.gone.*fix the import"):
        guest_closure.import_closure(repo, "ukgpu.app.main")
    with pytest.raises(guest_closure.GuestClosureError, match="ukgpu checkout"):
        guest_closure.import_closure(repo, "ukgpu.app.nothing")


def test_data_ships_with_the_module_that_reads_it(tmp_path, monkeypatch):
    repo = _tree(tmp_path, {"app/__init__.py": "", "app/main.py": "", "app/reader.py": "",
                            "app/data/a.bin": "x", "app/data/sub/b.json": "{}"})
    monkeypatch.setattr(guest_closure, "GUEST_DATA", {"ukgpu.app.reader": ("app/data",)})
    assert sorted(guest_closure.guest_files(repo, "ukgpu.app.main")) == ["app/__init__.py", "app/main.py"]
    (repo / "app/main.py").write_text("from ukgpu.app import reader\n")
    assert sorted(guest_closure.guest_files(repo, "ukgpu.app.main")) == [
        "app/__init__.py", "app/data/a.bin", "app/data/sub/b.json", "app/main.py", "app/reader.py"]
    monkeypatch.setattr(guest_closure, "GUEST_DATA", {"ukgpu.app.reader": ("app/missing",)})
    with pytest.raises(guest_closure.GuestClosureError, match="restore it"):
        guest_closure.guest_files(repo, "ukgpu.app.main")


def test_the_cache_key_covers_the_builder_but_not_the_launcher():
    """Editing how images are made rebuilds them; editing the QEMU launcher or the CLI does not."""
    builder = guest_closure.import_closure(REPO, "ukgpu.kernel.image.build")
    assert {"ukgpu.kernel.image.stage", "ukgpu.kernel.image.python_layout",
            "ukgpu.kernel.image.guest_closure"} <= set(builder)
    assert not {"ukgpu.kernel.image.qemu", "ukgpu.kernel.image.bench"} & set(builder)
    assert not any(name.startswith("ukgpu.tools") for name in builder)
    assert len(image_build._builder_digest()) == 64
