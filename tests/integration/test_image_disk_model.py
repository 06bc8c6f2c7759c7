"""An image whose model lives on a read-only virtio disk (models above --embed-limit): the
guest maps the block device, checks its sha256 against the image while loading, answers like
the host engine, and refuses a disk whose bytes differ."""

from __future__ import annotations

import json

import httpx
import pytest

from ukgpu.kernel.image import build as image_mod
from ukgpu.kernel.image import qemu

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def disk_image(built_image):  # built_image: the host tools are there (skips otherwise)
    return image_mod.build(image_mod.BuildConfig(model="smollm2-135m", embed_limit=1 << 20))


def test_the_model_disk_is_mapped_checked_and_served(disk_image, smollm2_path, attach_vm):
    assert disk_image.info["model"]["disk"] and disk_image.info["model"]["path"] == "/dev/vda"
    vm = attach_vm(qemu.Vm(disk_image, qemu.BootOptions(port=0)))
    vm.start()
    try:
        vm.wait_ready(timeout=420)
        log = vm.serial_log
        assert "ukgpu: model /dev/vda: llama, 30 layers" in log
        assert "model verified in" in log
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


def test_a_disk_with_other_bytes_is_refused(disk_image, smollm2_path, tmp_path, refused_boot):
    bad_disk = tmp_path / "model.gguf"
    data = bytearray(smollm2_path.read_bytes())
    data[-4096] ^= 0x01  # inside the last tensor's data: the file still parses
    bad_disk.write_bytes(bytes(data))
    info = json.loads(json.dumps(disk_image.info))
    info["model"]["host_path"] = str(bad_disk)
    vm = refused_boot(image_mod.Image(disk_image.dir, info))
    assert vm.fatal and "model disk /dev/vda: content differs" in vm.fatal, vm.tail()
