"""Same inputs, same bytes: two image builds from one snapshot of the inputs are identical.

Built without numba to stay within the CI budget (two builds ~1.5 min); the
numba cache's determinism was checked with full builds (docs/benchmarks/image.md).
"""

from __future__ import annotations

import copy
import shutil

import pytest

from ukgpu.kernel.image import build as image_mod
from ukgpu.kernel.image.guest_closure import guest_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_builds_from_the_same_inputs_are_byte_identical(tmp_path, monkeypatch):
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("needs apt-get and dpkg-deb (a Debian host): run tools/dev/host_deps.sh")
    snapshot = tmp_path / "src"  # teammates' sources may change while we build
    for rel, source in guest_files(image_mod.REPO).items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, snapshot / rel)
    monkeypatch.setattr(image_mod, "REPO", snapshot)
    config = image_mod.BuildConfig(model="smollm2-135m", numba=False)
    inputs = image_mod._resolve(config, log=lambda msg: None)
    infos = []
    for name in ("a", "b"):
        out = tmp_path / name
        image_mod._build_into(out, copy.deepcopy(inputs), config, log=lambda msg: None)
        infos.append(image_mod.load(out).info)
    assert infos[0]["sha256"] == infos[1]["sha256"]
    assert infos[0]["manifest_sha256"] == infos[1]["manifest_sha256"]
    assert infos[0]["cmdline"] == infos[1]["cmdline"]  # the disks' verity root hashes
    for name in ("initramfs.cpio", "root.img"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
