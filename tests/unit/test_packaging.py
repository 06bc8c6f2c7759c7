"""The wheel ships every package folder: pyproject's explicit list must name each of them."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOP = {"llama_core", "gpu", "ptx_kernels", "kernel", "tools"}


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for top in TOP:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            if rel[:2] == ("tools", "dev"):
                continue  # host-side development scripts stay out of the wheel
            found.add(".".join(("ukgpu",) + rel))
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    for top in TOP:
        assert cfg["package-dir"][f"ukgpu.{top}"] == top
