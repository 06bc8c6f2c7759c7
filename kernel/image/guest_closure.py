"""Which of ukgpu's files the guest needs: the import closure of its entry point, plus data.

The image carries only what PID 1 can reach: the builder, the QEMU launcher,
the Triton generator and the VFIO host setup stay on the host, and editing
them does not change the image (its cache key hashes the ukgpu files it holds).

The closure is computed statically from the source tree with `ast`, so it needs
neither the guest's libraries nor a GPU, and it sees every import the guest
could run, not just the ones one boot happens to take:
- imports anywhere in a module count, function-level ones included (the CUDA
  backend and the numba kernels are imported lazily);
- relative imports are resolved against the importing module's package;
- `from pkg import name` imports the module `pkg.name` when there is one;
- importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`: they are part of it;
- only `ukgpu.*` is followed (third-party packages come from their own layout).

`ukgpu.<top>.<rest>` lives at `<repo>/<top>/<rest>.py` or `<rest>/__init__.py`
(the package-dir mapping in pyproject.toml); `ukgpu` itself is a namespace.
Data files are attached to the module that reads them (`GUEST_DATA`) and ship
only when that module is in the closure.
"""

from __future__ import annotations

import ast
from pathlib import Path

from ukgpu.llama_core.errors import UkgpuError

ROOT = "ukgpu"
GUEST_ENTRY = "ukgpu.kernel.guest.init"
# {module: folders (repo-relative) it reads at run time}
GUEST_DATA = {
    "ukgpu.ptx_kernels.loader": ("ptx_kernels/build",),  # BUILD_DIR: the PTX/cubin manifests
    "ukgpu.llama_core.gguf.synthetic": ("llama_core/data/shapes",),  # SHAPES_DIR
}


class GuestClosureError(UkgpuError):
    """A guest module imports a ukgpu module that the source tree does not have."""


def module_path(repo: Path, name: str) -> Path | None:
    """The source file of ukgpu module `name` under `repo` (None: not a ukgpu module there)."""
    parts = name.split(".")
    if parts[0] != ROOT or len(parts) < 2:
        return None
    base = repo.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _resolve_from(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of `from <node.module> import ...` inside module `name`."""
    if node.level == 0:
        return node.module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    anchor = package[:len(package) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imported_names(name: str, source: Path) -> tuple[set[str], set[str]]:
    """The ukgpu modules module `name` may import, wherever the import statement stands.

    Returns (modules, members): `import a.b` and the `pkg` of `from pkg import x` must be
    modules; the `pkg.x` of `from pkg import x` is one only if such a module exists.
    """
    tree = ast.parse(source.read_bytes(), filename=str(source))
    is_package = source.name == "__init__.py"
    modules: set[str] = set()
    members: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(name, is_package, node)
            modules.add(base)
            members.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return _ukgpu_only(modules), _ukgpu_only(members)


def _ukgpu_only(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith(ROOT + ".")}


def _with_parents(name: str) -> list[str]:
    """`ukgpu.a.b.c` -> [`ukgpu.a`, `ukgpu.a.b`, `ukgpu.a.b.c`] (the namespace itself has no file)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def import_closure(repo: Path, entry: str = GUEST_ENTRY) -> dict[str, Path]:
    """{module name: source file} of every ukgpu module importing `entry` can reach."""
    if module_path(repo, entry) is None:
        raise GuestClosureError(f"{entry} is not under {repo}: run from a ukgpu checkout")
    found: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        for module in _with_parents(name):
            if module in found:
                continue
            path = module_path(repo, module)
            if path is None:
                raise GuestClosureError(f"{name} is imported by the guest but {module} is not in "
                                        f"{repo}: fix the import or add the module")
            found[module] = path
            todo.extend(_imports_that_exist(repo, module, path))
    return dict(sorted(found.items()))


def _imports_that_exist(repo: Path, module: str, path: Path) -> list[str]:
    """The modules `module` imports; one it names as a module but that is missing is an error."""
    modules, members = imported_names(module, path)
    for name in sorted(modules):
        if module_path(repo, name) is None:
            raise GuestClosureError(f"{module} ({path}) imports {name}, which is not in {repo}: "
                                    "fix the import (the guest would fail on it)")
    return sorted(modules | {m for m in members if module_path(repo, m) is not None})


def guest_files(repo: Path, entry: str = GUEST_ENTRY) -> dict[str, Path]:
    """{path relative to `repo`: file} of the guest's ukgpu sources and the data they read."""
    modules = import_closure(repo, entry)
    files = {path.relative_to(repo).as_posix(): path for path in modules.values()}
    for module, folders in GUEST_DATA.items():
        if module not in modules:
            continue
        for folder in folders:
            base = repo / folder
            if not base.is_dir():
                raise GuestClosureError(f"{module} reads {base}, which is missing: "
                                        "restore it from git (or regenerate it)")
            for path in sorted(base.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    files[path.relative_to(repo).as_posix()] = path
    return dict(sorted(files.items()))
