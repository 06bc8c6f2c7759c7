"""`ukgpu image export --oci`: OCI layouts for KubeVirt written without a daemon, checked from the
bytes on disk: layout files, blob digests, config diff_ids, owners 107:107, reproducibility.
A tiny fake image folder (image.json + small files) stands in for a built image."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from ukgpu.kernel.image import build, export, oci
from ukgpu.tools import cli

MANIFEST_SHA = "ab" * 32


def fake_image(root: Path, disk: bool) -> Path:
    """An image folder as `ukgpu image build -o` writes it, with small stand-in files."""
    root.mkdir(parents=True)
    (root / "vmlinux").write_bytes(b"\x7fELF kernel " * 300)
    (root / "initramfs.cpio").write_bytes(bytes(range(256)) * 40)
    (root / "manifest.json").write_text("{}")
    (root / "root.img").write_bytes(b"erofs root " * 500)
    model = b"GGUF" + b"\x01" * 1000
    if disk:
        (root / "model.img").write_bytes(model + bytes(4096 - len(model)) + b"tree" * 8)
    info = {"kernel": "vmlinux", "initramfs": "initramfs.cpio", "manifest_sha256": MANIFEST_SHA,
            "cmdline": f"console=ttyS0 panic=-1 quiet ukgpu.manifest={MANIFEST_SHA} ukgpu.root=2:{'cd' * 32}:00",
            "disks": {"root": "root.img", **({"model": "model.img"} if disk else {})},
            "model": {"name": "tiny", "sha256": hashlib.sha256(model).hexdigest(),
                      "size": len(model), "disk": disk,
                      "path": "/dev/ukgpu-model" if disk else "/models/tiny.gguf"}}
    (root / "image.json").write_text(json.dumps(info))
    return root


def layer_members(root: Path, manifest: dict) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    (desc,) = manifest["layers"]
    data = oci.blob_path(root, desc).read_bytes()
    if desc["mediaType"].endswith("+gzip"):
        data = gzip.decompress(data)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            out[m.name] = (m, f.read() if f else b"")
    return out


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("compress", [False, True])
def test_layout_is_valid_and_blobs_match_their_digests(tmp_path, compress):
    image = build.load(fake_image(tmp_path / "img", disk=True))
    done = export.export_oci(image, tmp_path / "oci", compress=compress, log=lambda m: None)
    root = done.dir
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["mediaType"] == oci.MEDIA_INDEX
    manifests = oci.read_index(root)  # every blob re-hashed against its descriptor
    assert set(manifests) == {"boot", "root-disk", "model-disk"}
    for name, manifest in manifests.items():
        assert manifest["mediaType"] == oci.MEDIA_MANIFEST and manifest["schemaVersion"] == 2
        config = json.loads(oci.read_blob(root, manifest["config"]))
        assert manifest["config"]["mediaType"] == oci.MEDIA_CONFIG
        assert config["os"] == "linux" and config["architecture"] == "amd64"
        (layer,) = manifest["layers"]
        assert layer["mediaType"] == (oci.MEDIA_LAYER_GZIP if compress else oci.MEDIA_LAYER)
        tar_bytes = oci.blob_path(root, layer).read_bytes()
        if compress:
            tar_bytes = gzip.decompress(tar_bytes)
        assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}"]
        assert done.args["images"][name] == next(
            d["digest"] for d in index["manifests"] if d["annotations"][oci.REF_NAME] == name)


def test_boot_files_owned_by_qemu_user_and_unchanged(tmp_path):
    src = fake_image(tmp_path / "img", disk=True)
    root = export.export_oci(build.load(src), tmp_path / "oci", log=lambda m: None).dir
    manifests = oci.read_index(root)
    boot = layer_members(root, manifests["boot"])
    assert sorted(boot) == ["boot", "boot/initramfs", "boot/vmlinux"]
    for name, original in (("boot/vmlinux", "vmlinux"), ("boot/initramfs", "initramfs.cpio")):
        info, data = boot[name]
        assert (info.uid, info.gid) == (107, 107) and info.isfile() and info.mtime == 0
        assert info.uname == "" and info.gname == ""
        assert data == (src / original).read_bytes()  # the files taken back out are the image's
    for ref, name in (("root-disk", "root.img"), ("model-disk", "model.img")):
        disk = layer_members(root, manifests[ref])
        assert sorted(disk) == ["disk", f"disk/{name}"]
        info, data = disk[f"disk/{name}"]
        assert (info.uid, info.gid) == (107, 107)
        assert data == (src / name).read_bytes()


def test_two_exports_are_byte_identical_and_epoch_changes_them(tmp_path, monkeypatch):
    image = build.load(fake_image(tmp_path / "img", disk=True))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = all_bytes(export.export_oci(image, tmp_path / "a", compress=True, log=lambda m: None).dir)
    second = all_bytes(export.export_oci(image, tmp_path / "b", compress=True, log=lambda m: None).dir)
    assert first == second
    assert not any(name.endswith(".part") for name in first)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    third = all_bytes(export.export_oci(image, tmp_path / "c", compress=True, log=lambda m: None).dir)
    assert third["index.json"] != first["index.json"]  # mtimes are in the layers, so in the digests


def test_embedded_model_has_no_model_disk_image_and_kernel_args(tmp_path):
    image = build.load(fake_image(tmp_path / "img", disk=False))
    done = export.export_oci(image, tmp_path / "oci", extra_args=["ukgpu.slots=2"], log=lambda m: None)
    assert set(oci.read_index(done.dir)) == {"boot", "root-disk"}
    assert done.args["rootDiskPath"] == "/disk/root.img"
    args = json.loads((done.dir / export.ARGS_JSON).read_text())
    words = args["kernelArgs"].split()
    assert f"ukgpu.manifest={MANIFEST_SHA}" in words and export.MASQUERADE_IP in words
    assert words[-1] == "ukgpu.slots=2"
    assert (done.dir / export.ARGS_TXT).read_text().strip() == args["kernelArgs"]
    assert args["kernelPath"] == "/boot/vmlinux" and args["initrdPath"] == "/boot/initramfs"
    assert "diskPath" not in args["model"] and args["model"]["disk"] is False


def test_a_damaged_blob_is_found(tmp_path):
    root = export.export_oci(build.load(fake_image(tmp_path / "img", disk=False)), tmp_path / "oci",
                             log=lambda m: None).dir
    layer = oci.read_index(root)["boot"]["layers"][0]
    path = oci.blob_path(root, layer)
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(oci.OciError, match="does not match"):
        oci.read_index(root)


def test_refusals_name_the_fix(tmp_path):
    src = fake_image(tmp_path / "img", disk=False)
    info = json.loads((src / "image.json").read_text())
    info["cmdline"] = "console=ttyS0"
    (src / "image.json").write_text(json.dumps(info))
    with pytest.raises(build.ImageError, match="ukgpu image build"):
        export.export_oci(build.load(src), tmp_path / "oci", log=lambda m: None)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(build.ImageError, match="not an OCI layout"):
        export.export_oci(build.load(fake_image(tmp_path / "img2", disk=False)), busy, log=lambda m: None)
    assert (busy / "keep.txt").read_text() == "mine"


def test_cli_export_prints_the_kernel_args(tmp_path, capsys):
    src = fake_image(tmp_path / "img", disk=True)
    assert cli.main(["image", "export", "--oci", str(tmp_path / "oci"), str(src), "--append", "ukgpu.ctx=512"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "oci" / export.ARGS_JSON).read_text())
    assert printed["kernelArgs"].endswith("ukgpu.ctx=512")
    assert set(oci.read_index(tmp_path / "oci")) == {"boot", "root-disk", "model-disk"}
