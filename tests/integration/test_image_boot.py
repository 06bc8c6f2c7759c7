"""Boot the real image under QEMU (TCG): READY, a completion over HTTP, clean poweroff (console only), and a
tampered image refused: boot files by the host before boot; the root disk, its hash tree and the model
by the guest's kernel (dm-verity) as it reads them.  Failing tests carry the guest's serial console."""

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
    for key in ("total", "boot_to_init", "root", "python_start", "verify", "modules", "network",
                "model_load", "http"):
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


def _copy_with_flip(image: image_mod.Image, dest, disk: str, at: int) -> image_mod.Image:
    """A copy of the image (boot files hard-linked: the host's record still matches them) whose
    disk `disk` has the byte at `at` flipped."""
    dest.mkdir()
    for name in ("vmlinux", "initramfs.cpio", "manifest.json", "image.json"):
        os.link(image.dir / name, dest / name) if _same_fs(image.dir, dest) else \
            shutil.copy(image.dir / name, dest / name)
    for name in image.info["disks"].values():
        shutil.copy(image.dir / name, dest / name)
    with open(dest / disk, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x20]))
    return image_mod.load(dest)


def _same_fs(a, b) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _offset_of(path, needle: bytes) -> int:
    data = path.read_bytes()
    at = data.find(needle)
    assert at >= 0, f"{needle[:40]!r} is not in {path}"
    return at


def _data_blocks(image: image_mod.Image, word: str) -> int:
    cmdline = image.info["cmdline"].split()
    return int(next(w for w in cmdline if w.startswith(word + "=")).split("=", 1)[1].split(":")[0])


def test_a_flipped_byte_in_the_root_disk_is_refused_when_read(built_image, tmp_path, refused_boot):
    """The host's record covers the boot files, not the 300 MiB root disk: the guest's kernel
    checks each of its blocks on first read, and the one holding the API's bytecode fails."""
    root = built_image.dir / built_image.info["disks"]["root"]
    # a string of kernel/api/app.py's docstring: in the .py and in the .pyc Python loads
    needle = b"The Starlette application: routes, body limits, error shapes"
    at = _offset_of(root, needle)
    data = root.read_bytes()
    bad = _copy_with_flip(built_image, tmp_path / "bad", "root.img", at + 5)
    pyc = data.find(needle, at + 1)
    if pyc >= 0:  # flip the bytecode's copy too: Python reads that one
        with open(bad.dir / "root.img", "r+b") as f:
            f.seek(pyc + 5)
            f.write(bytes([data[pyc + 5] ^ 0x20]))
    trust.verify_for_boot(bad.dir).cleanup()  # the host's record still matches the boot files
    vm = refused_boot(bad)
    assert vm.fatal and "verity" in vm.fatal and "refusing to serve" in vm.fatal, vm.tail()


def test_a_flipped_byte_in_the_hash_tree_is_refused(built_image, tmp_path, refused_boot):
    """The top block of the tree is checked against the root hash on the command line first:
    with it changed no block of the root disk can be read and the root never mounts."""
    top = _data_blocks(built_image, "ukgpu.root") * 4096
    vm = refused_boot(_copy_with_flip(built_image, tmp_path / "bad", "root.img", top + 100))
    assert vm.fatal and "root filesystem does not mount" in vm.fatal, vm.tail()
    assert any("verity" in line for line in vm.log), vm.tail()


def test_a_flipped_byte_in_the_embedded_model_is_refused(built_image, smollm2_path, tmp_path,
                                                        refused_boot):
    """The model is memory-mapped from the verity root: the page that fails its check raises
    SIGBUS in the guest process, and PID 1 reports it and powers off."""
    root = built_image.dir / built_image.info["disks"]["root"]
    with open(smollm2_path, "rb") as f:
        head = f.read(4096)
    at = _offset_of(root, head[:256])
    vm = refused_boot(_copy_with_flip(built_image, tmp_path / "bad", "root.img", at + 2000))
    assert vm.fatal and "verity" in vm.fatal, vm.tail()


def test_a_second_verify_or_root_word_cannot_turn_the_check_off(built_image, refused_boot):
    """Another launcher (or an edited command) appending ukgpu.verify=off or its own root hash
    after the host's words: stage 1 takes each word once and refuses to guess."""
    for extra in ("ukgpu.verify=off", "ukgpu.root=1:" + "00" * 32 + ":00"):
        vm = qemu.Vm(built_image, qemu.BootOptions(port=0))  # the host's words, verified boot files
        vm.command[vm.command.index("-append") + 1] += " " + extra
        vm = refused_boot(vm)
        assert vm.fatal and "appears twice" in vm.fatal, vm.tail()


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
