"""An image whose model lives on its own read-only virtio disk (models above --embed-limit): the
guest maps it through dm-verity (nothing hashed before READY: each block is checked when first
read), answers like the host engine, and refuses a disk whose bytes differ."""

from __future__ import annotations

import os

import httpx
import pytest

from ukgpu.kernel.image import build as image_mod
from ukgpu.kernel.image import qemu

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def disk_image(built_image):  # built_image: the host tools are there (skips otherwise)
    return image_mod.build(image_mod.BuildConfig(model="smollm2-135m", embed_limit=1 << 20))


def test_the_model_disk_is_mapped_checked_and_served(disk_image, smollm2_path, attach_vm):
    assert disk_image.info["model"]["disk"] and disk_image.info["model"]["path"] == "/dev/ukgpu-model"
    assert "ukgpu.model_disk=" in disk_image.info["cmdline"]
    vm = attach_vm(qemu.Vm(disk_image, qemu.BootOptions(port=0)))
    vm.start()
    try:
        vm.wait_ready(timeout=420)
        log = vm.serial_log
        assert "ukgpu: model /dev/ukgpu-model: llama, 30 layers" in log
        assert "model /dev/ukgpu-model on its own verity disk" in log
        resp = httpx.post(vm.url + "/v1/completions", timeout=400,
                          json={"model": "smollm2-135m", "prompt": "The capital of France is",
                                "max_tokens": 2, "temperature": 0})
        assert resp.status_code == 200, resp.text
        from ukgpu.llama_core.engine import Engine
        from ukgpu.llama_core.sampling import SamplingParams

        engine = Engine.load(smollm2_path, backend="cpu", n_ctx=64)
        ids = engine.tokenizer.encode("The capital of France is")
        want = "".join(e.text for e in engine.generate(ids, SamplingParams(temperature=0.0), 2))
        assert resp.json()["choices"][0]["text"] == want
    finally:
        vm.kill()


def test_a_disk_with_other_bytes_is_refused(disk_image, tmp_path, refused_boot):
    """One byte changed in the GGUF header's metadata (read while the model is opened): the page
    fails its hash check, the mapped read raises SIGBUS, PID 1 says so and powers off."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("vmlinux", "initramfs.cpio", "manifest.json", "image.json", "root.img"):
        os.link(disk_image.dir / name, bad / name)  # unchanged: the host's record matches
    data = bytearray((disk_image.dir / "model.img").read_bytes())
    data[300] ^= 0x01
    (bad / "model.img").write_bytes(bytes(data))
    vm = refused_boot(image_mod.load(bad))
    assert vm.fatal and "SIGBUS" in vm.fatal and "verity" in vm.fatal, vm.tail()


def test_the_model_disk_is_the_model_and_a_small_hash_tree(disk_image, smollm2_path):
    """model.img is the GGUF bytes padded to 4 KiB plus the tree: 32 bytes per 4 KiB, ~1/128 more."""
    size = disk_image.info["model"]["size"]
    disk = disk_image.dir / "model.img"
    assert size < disk.stat().st_size < size * 1.01 + 8192
    with open(disk, "rb") as got, open(smollm2_path, "rb") as want:
        assert got.read(1 << 20) == want.read(1 << 20)
