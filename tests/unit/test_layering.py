"""The product's layers, read from its imports (no module is executed).

    tools (CLI, bench) ─► kernel (guest, image, api) ─► gpu (pci, vfio, cuda) ─► ptx_kernels ─► llama_core

An arrow is "may import".  llama_core is the CPU reference and the model: it imports gpu, kernel
and ptx_kernels only inside a function (the CUDA backend is opened on demand), never at module
level, so `import ukgpu.llama_core.engine` works where no GPU stack is installed.  gpu never
imports kernel; nothing imports tools but tools; nothing in the product imports the test doubles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("llama_core", "gpu", "kernel", "ptx_kernels", "tools")
TEST_ONLY = ("fakes", "tests", "cuda_stub", "libcuda_stub")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("ukgpu", *parts))


def _product_files() -> list[Path]:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py")
                  if "__pycache__" not in p.parts and p.parts[len(ROOT.parts):][:2] != ("tools", "dev"))


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of `path`."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found.append((base, top))
            visit(child, inner)

    visit(tree, True)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "ukgpu" and len(parts) > 1 else None


def _violations(rule) -> list[str]:
    out = []
    for path in _product_files():
        mine = _layer(_module(path))
        for target, top in _imports(path):
            why = rule(mine, target, top)
            if why:
                out.append(f"{path.relative_to(ROOT)} imports {target}: {why}")
    return out


def test_the_product_files_are_found():
    files = _product_files()
    assert len(files) > 80
    assert ROOT / "llama_core" / "engine.py" in files
    assert not any("dev" in p.relative_to(ROOT).parts[:2] for p in files)


def test_llama_core_imports_no_device_or_guest_layer_at_module_level():
    def rule(mine, target, top):
        if mine == "llama_core" and top and _layer(target) in ("gpu", "kernel", "ptx_kernels", "tools"):
            return "llama_core may import it only inside a function"
    assert _violations(rule) == []


def test_gpu_and_ptx_kernels_never_import_kernel_or_tools():
    def rule(mine, target, top):
        if mine in ("gpu", "ptx_kernels") and _layer(target) in ("kernel", "tools"):
            return f"{mine} sits below kernel and tools"
        if mine == "ptx_kernels" and _layer(target) == "gpu":
            return "the kernels and their manifest do not depend on the driver layer"
    assert _violations(rule) == []


def test_only_tools_import_tools():
    def rule(mine, target, top):
        if mine != "tools" and _layer(target) == "tools":
            return "tools (the CLI and benchmarks) sit on top"
    assert _violations(rule) == []


def test_nothing_in_the_product_imports_the_test_doubles():
    def rule(mine, target, top):
        if target.split(".")[0] in TEST_ONLY:
            return "test doubles live under tests/ and are never shipped"
    assert _violations(rule) == []


@pytest.mark.parametrize("source, expect", [
    ("import ukgpu.gpu.cuda.driver\n", [("ukgpu.gpu.cuda.driver", True)]),
    ("def f():\n    from ukgpu.gpu import cuda\n", [("ukgpu.gpu", False)]),
    ("class A:\n    from ukgpu.kernel import manifest\n", [("ukgpu.kernel", True)]),
    ("from . import sysfs\n", [("ukgpu.gpu.pci", True)]),
])
def test_the_import_reader_tells_module_level_from_function_level(tmp_path, monkeypatch, source, expect):
    path = ROOT / "gpu" / "pci" / "_layering_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert _imports(path) == expect
