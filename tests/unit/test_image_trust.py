"""The host's chain of trust for images (kernel/image/trust.py) and the guest's refusals.

Built on small stand-in image folders: the host boots only files it has a record of, with the
command line from that record; an appended cpio, an edited image.json or an --append override
get nowhere; the guest refuses a second manifest or verify word and a model outside its manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import tempfile

import httpx
import pytest
from test_api_fakes import FakeEngine

from ukgpu.kernel.api import create_app
from ukgpu.kernel.api.server import background
from ukgpu.kernel.guest import init as guest_init
from ukgpu.kernel.guest.syscalls import InitError
from ukgpu.kernel.image import build, qemu, trust
from ukgpu.kernel.manifest import ManifestError

CMDLINE = "console=ttyS0 panic=-1 quiet ukgpu.manifest=" + "ab" * 32


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UKGPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path


def make_image(folder, kernel=b"\x7fELF kernel", initramfs=b"070701 archive") -> build.Image:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vmlinux").write_bytes(kernel)
    (folder / "initramfs.cpio").write_bytes(initramfs)
    (folder / "manifest.json").write_text("{}")
    info = {"kernel": "vmlinux", "initramfs": "initramfs.cpio", "cmdline": CMDLINE,
            "sha256": {"vmlinux": hashlib.sha256(kernel).hexdigest(),
                       "initramfs.cpio": hashlib.sha256(initramfs).hexdigest()},
            "sizes": {"initramfs": len(initramfs)},
            "model": {"name": "m", "path": "/models/m.gguf", "sha256": "cd" * 32, "disk": False,
                      "size": 10, "host_path": None}}
    (folder / "image.json").write_text(json.dumps(info))
    return build.load(folder)


def test_a_pinned_image_boots_private_copies_with_the_records_command_line(cache):
    image = make_image(cache / "img")
    digest = trust.pin(image.info)
    info = json.loads((image.dir / "image.json").read_text())
    info["cmdline"] += " ukgpu.verify=off"  # an edited image.json is not believed
    (image.dir / "image.json").write_text(json.dumps(info))
    boot = trust.verify_for_boot(image.dir)
    try:
        assert boot.digest == digest and boot.cmdline == CMDLINE
        assert boot.initramfs.read_bytes() == (image.dir / "initramfs.cpio").read_bytes()
        assert stat.S_IMODE(boot.folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(boot.kernel.stat().st_mode) == 0o400
        cmd = qemu.qemu_command(build.load(image.dir), qemu.BootOptions(), 1, boot)
        assert cmd[cmd.index("-initrd") + 1] == str(boot.initramfs)
        assert cmd[cmd.index("-append") + 1] == CMDLINE + " ukgpu.verify=host"
    finally:
        boot.cleanup()
    assert not boot.folder.exists()


def test_an_appended_cpio_is_refused_before_boot_and_leaves_nothing(cache, monkeypatch):
    image = make_image(cache / "img")
    trust.pin(image.info)
    with open(image.dir / "initramfs.cpio", "ab") as f:
        f.write(b"070701 attacker's init")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(trust.TrustError, match="no record of an image"):
        qemu.Vm(image, qemu.BootOptions(port=1))
    assert not list((cache / "tmp").iterdir())  # the private copies went too


def test_an_image_from_elsewhere_is_pinned_only_with_its_digest(cache):
    image = make_image(cache / "img")
    right = trust.digest_of(trust.record_of(image.info))
    with pytest.raises(trust.TrustError, match="no record"):
        trust.verify_for_boot(image.dir)
    with pytest.raises(trust.TrustError, match="not " + "0" * 64):
        trust.pin_folder(image.dir, image.info, "0" * 64)
    (image.dir / "vmlinux").write_bytes(b"\x7fELF kerneX")
    with pytest.raises(trust.TrustError, match="does not match its record"):
        trust.pin_folder(image.dir, image.info, right)
    (image.dir / "vmlinux").write_bytes(b"\x7fELF kernel")
    assert trust.pin_folder(image.dir, image.info, right) == right
    trust.verify_for_boot(image.dir).cleanup()


def test_append_cannot_override_the_image_check_and_skipping_is_said(cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    image = make_image(cache / "img")
    for word in ("ukgpu.verify=off", "ukgpu.manifest=" + "00" * 32):
        with pytest.raises(qemu.BootError, match="--insecure-skip-verify"):
            qemu.qemu_command(image, qemu.BootOptions(append=[word]), 1)
    vm = qemu.Vm(image, qemu.BootOptions(port=1, verify=False))  # no record needed when asked
    assert vm.command[vm.command.index("-append") + 1].endswith(" ukgpu.verify=off")


def test_the_guest_refuses_a_second_manifest_or_verify_word():
    guest_init.BootConfig.parse(CMDLINE + " ukgpu.ctx=64")
    for extra in ("ukgpu.manifest=" + "00" * 32, "ukgpu.verify=off"):
        twice = CMDLINE + " ukgpu.verify=full " + extra if "verify" in extra else CMDLINE + " " + extra
        with pytest.raises(InitError, match="appears twice"):
            guest_init.BootConfig.parse(twice)


def test_the_guest_refuses_a_model_outside_its_manifest(monkeypatch):
    doc = {"files": {"/models/m.gguf": {}}, "model": {"path": "/models/m.gguf", "disk": False}}
    monkeypatch.setattr(guest_init.manifest, "load", lambda path, digest: doc)
    guest = guest_init.Guest(t_init=0.0)
    guest.cfg = guest_init.BootConfig.parse(CMDLINE + " ukgpu.model=/tmp/evil.gguf")
    with pytest.raises(ManifestError, match="not a file of the image's manifest"):
        guest.verify_image()


def test_exports_are_copies_not_links(cache):
    image = make_image(cache / "img")
    out = build._export(image, cache / "out")
    assert (out.dir / "initramfs.cpio").stat().st_ino != (image.dir / "initramfs.cpio").stat().st_ino
    (out.dir / "initramfs.cpio").write_bytes(b"edited")
    assert (image.dir / "initramfs.cpio").read_bytes() == b"070701 archive"


def test_health_carries_the_guests_image_check():
    app = create_app(FakeEngine(), model_id="m", health_extra={"image_verified": False})
    with background(app) as url:
        body = httpx.get(url + "/health", timeout=5).json()
    assert body["status"] == "ready" and body["image_verified"] is False


def test_images_sharing_boot_files_boot_with_their_own_records_root_hash(cache):
    """Two images of one builder have the same kernel and stage-1 initramfs and differ only in the
    root hash on their command lines: each folder boots with its own record, and a folder whose
    image.json names neither record is refused rather than given one at random."""
    first = make_image(cache / "a")
    second = make_image(cache / "b")
    for image, root in ((first, "11"), (second, "22")):
        image.info["cmdline"] = f"{CMDLINE} ukgpu.root=9:{root * 32}:00:sha256"
        (image.dir / "image.json").write_text(json.dumps(image.info))
        trust.pin(image.info)
    for image, root in ((first, "11"), (second, "22")):
        boot = trust.verify_for_boot(image.dir)
        try:
            assert f"ukgpu.root=9:{root * 32}:00:sha256" in boot.cmdline
        finally:
            boot.cleanup()
    edited = json.loads((second.dir / "image.json").read_text())
    edited["cmdline"] += " ukgpu.verify=off"
    (second.dir / "image.json").write_text(json.dumps(edited))
    with pytest.raises(trust.TrustError, match="names none of them"):
        trust.verify_for_boot(second.dir)
