"""Boot the real image under QEMU (TCG): READY, a completion over HTTP, clean poweroff (console only), and a
tampered image refused (by the host before boot, and by the guest if the host was fooled).  Failing tests carry the guest's serial console."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from ukgpu.kernel.image import build as image_mod
from ukgpu.kernel.image import qemu, trust

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ready_reports_boot_timings(serving_vm):
    ready = serving_vm.ready
    for key in ("total", "boot_to_init", "verify", "modules", "network", "model_load", "http"):
        assert key in ready, f"READY line lacks {key}: {ready}"
    assert 0 < ready["boot_to_init"] < ready["total"]
    assert ready["port"] == qemu.GUEST_PORT
    assert any("image verified" in line for line in serving_vm.log)
    assert any(line.startswith("ukgpu: backend cpu") for line in serving_vm.log), \
        "no GPU here: the guest must say it fell back to the CPU and why"


def test_health_and_models(serving_vm):
    health = httpx.get(serving_vm.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    models = httpx.get(serving_vm.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m"]


def test_completion_over_http_matches_the_host_engine(serving_vm, smollm2_path):
    body = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 3,
            "temperature": 0}
    resp = httpx.post(serving_vm.url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    text = got["choices"][0]["text"]
    assert text.strip(), got
    assert 0 < got["usage"]["completion_tokens"] <= 3
    from ukgpu.llama_core.engine import Engine
    from ukgpu.llama_core.sampling import SamplingParams

    engine = Engine.load(smollm2_path, backend="cpu", n_ctx=256, n_slots=1)
    ids = engine.tokenizer.encode(body["prompt"])
    events = list(engine.generate(ids, SamplingParams(temperature=0.0), max_tokens=3))
    host_text = "".join(e.text for e in events)
    assert text == host_text, "the guest's greedy completion differs from the host CPU engine"


def test_the_api_port_cannot_power_off_and_the_console_stops_qemu_cleanly(serving_vm):
    """Whatever reaches the forwarded port (a browser on the host too) must not stop the guest:
    poweroff is a serial console command, which only the process running QEMU holds."""
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    assert httpx.post(serving_vm.url + "/admin/poweroff", headers=page, timeout=30).status_code == 403
    assert httpx.post(serving_vm.url + "/admin/poweroff", json={}, timeout=30).status_code == 404
    assert httpx.get(serving_vm.url + "/health", timeout=30).status_code == 200
    assert serving_vm.poweroff(timeout=60) == 0
    assert any("powering off: poweroff on the serial console" in line for line in serving_vm.log)
    assert serving_vm.fatal is None


def _tampered_copy(image: image_mod.Image, dest) -> tuple[image_mod.Image, str]:
    """A copy of the image whose initramfs has one byte of one file changed (same size)."""
    victim = "usr/lib/python3/dist-packages/ukgpu/kernel/api/app.py"
    data = bytearray((image.dir / "initramfs.cpio").read_bytes())
    name_at = data.index(victim.encode() + b"\0")
    content_at = (name_at + len(victim) + 1 + 3) & ~3
    data[content_at + 10] ^= 0x20
    dest.mkdir()
    (dest / "initramfs.cpio").write_bytes(bytes(data))
    for name in ("vmlinux", "manifest.json", "image.json"):
        os.link(image.dir / name, dest / name) if _same_fs(image.dir, dest) else \
            shutil.copy(image.dir / name, dest / name)
    return image_mod.load(dest), "/" + victim


def _same_fs(a, b) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def test_tampered_image_is_refused_by_the_host_and_by_a_guest_checking_alone(built_image, tmp_path,
                                                                             refused_boot):
    """The host has no record of the changed initramfs and refuses it before QEMU starts.  Booted
    by another launcher (the image's own command line, no `ukgpu.verify=host`), the guest hashes
    every file itself and refuses the changed one."""
    bad, victim = _tampered_copy(built_image, tmp_path / "bad")
    with pytest.raises(trust.TrustError, match="no record of an image"):
        qemu.Vm(bad, qemu.BootOptions(port=0))
    vm = refused_boot(bad, raw=True)
    assert "ukgpu.verify" not in vm.command[vm.command.index("-append") + 1]
    assert vm.fatal and "image tampered" in vm.fatal and victim in vm.fatal, vm.tail()


def test_an_appended_cpio_is_refused_before_boot(built_image, tmp_path):
    """The kernel unpacks concatenated archives, later entries winning: an appended cpio could
    replace the checker itself, so the host refuses the file before the guest runs anything."""
    dest = tmp_path / "appended"
    shutil.copytree(built_image.dir, dest)
    with open(dest / "initramfs.cpio", "ab") as f:
        f.write(b"070701" + b"0" * 104 + b"TRAILER!!!\0")
    with pytest.raises(trust.TrustError, match="no record of an image"):
        qemu.Vm(image_mod.load(dest), qemu.BootOptions(port=0))


def test_the_acpi_power_button_powers_the_guest_off_cleanly(built_image, attach_vm):
    """What a hypervisor's stop or a node drain does (QEMU `system_powerdown`): the guest powers
    off by itself, QEMU exits 0."""
    vm = attach_vm(qemu.Vm(built_image, qemu.BootOptions(port=0)))
    vm.start()
    vm.wait_ready(timeout=420)
    vm.press_power_button()
    assert vm.wait(timeout=120) == 0
    assert any("powering off: the ACPI power button" in line for line in vm.log), vm.tail()
    assert vm.fatal is None
