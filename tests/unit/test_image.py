"""Image builder pieces that need no downloads: cpio writer, vmlinux extraction, ELF closure,
layout rules, QEMU command line."""

import gzip
import hashlib
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from ukgpu.kernel.image import (
    debs,
    qemu,
)
from ukgpu.kernel.image import (
    elf as image_elf,
)
from ukgpu.kernel.image import (
    python_layout as image_python,
)
from ukgpu.kernel.image import (
    vmlinux as image_kernel,
)
from ukgpu.kernel.image.build import Image
from ukgpu.kernel.image.initramfs import Initramfs, InitramfsError


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, int]]:
    """{name: (mode, data, mtime)} from a newc archive (an independent reader)."""
    out, at = {}, 0
    while True:
        assert data[at:at + 6] == b"070701", f"bad magic at {at}"
        fields = [int(data[at + 6 + 8 * i: at + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, size, namesize = fields[1], fields[5], fields[6], fields[11]
        name = data[at + 110: at + 110 + namesize - 1].decode()
        at = (at + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[at:at + size], mtime)
        at = (at + size + 3) & ~3


def _sample(tmp_path: Path) -> Initramfs:
    src = tmp_path / "src"
    (src / "pkg/sub").mkdir(parents=True)
    (src / "pkg/a.py").write_text("A = 1\n")
    (src / "pkg/sub/b.bin").write_bytes(bytes(range(256)) * 3)
    (src / "pkg/sub/skip.pyc").write_bytes(b"x")
    (src / "pkg/link").symlink_to("a.py")
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "tool").chmod(0o755)
    img = Initramfs()
    img.add_tree(src, "/opt", keep=lambda rel: not rel.endswith(".pyc"))
    img.add_file("/init", data=b"#!/bin/sh\necho hi\n", mode=0o755)
    img.add_node("/dev/console", "c", 5, 1)
    return img


def test_initramfs_roundtrip_and_metadata(tmp_path):
    out = tmp_path / "a.cpio"
    size = _sample(tmp_path).write(out)
    data = out.read_bytes()
    assert size == len(data) and size % 512 == 0
    entries = read_newc(data)
    assert list(entries) == sorted(entries)  # sorted, parents first
    assert {"opt", "opt/pkg", "opt/pkg/sub", "dev"} <= set(entries)  # implied parents
    assert entries["opt/pkg/sub/b.bin"][1] == bytes(range(256)) * 3
    assert "opt/pkg/sub/skip.pyc" not in entries
    mode, target, _ = entries["opt/pkg/link"]
    assert stat.S_ISLNK(mode) and target == b"a.py"
    assert stat.S_IMODE(entries["opt/tool"][0]) == 0o755
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert {e[2] for e in entries.values()} == {0}  # fixed mtimes


def test_initramfs_is_reproducible_and_gzip_too(tmp_path, monkeypatch):
    img = _sample(tmp_path)
    digests = set()
    for name in ("x.cpio", "y.cpio"):
        img.write(tmp_path / name)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1
    img.write(tmp_path / "x.gz", compress="gzip")
    img.write(tmp_path / "other-name.gz", compress="gzip")
    assert (tmp_path / "x.gz").read_bytes() == (tmp_path / "other-name.gz").read_bytes()
    assert gzip.decompress((tmp_path / "x.gz").read_bytes()) == (tmp_path / "x.cpio").read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    img.write(tmp_path / "z.cpio")
    assert {e[2] for e in read_newc((tmp_path / "z.cpio").read_bytes()).values()} == {1700000000}


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_lists_the_archive(tmp_path):
    _sample(tmp_path).write(tmp_path / "a.cpio")
    listed = subprocess.run(["cpio", "-t"], stdin=open(tmp_path / "a.cpio", "rb"),
                            capture_output=True, text=True, check=True).stdout.split()
    assert "opt/pkg/sub/b.bin" in listed and "dev/console" in listed


def test_initramfs_rejects_bad_entries(tmp_path):
    img = Initramfs()
    with pytest.raises(InitramfsError):
        img.add_file("/../etc/passwd", data=b"")
    with pytest.raises(InitramfsError):
        img.add_file("/x", source=tmp_path / "missing")
    with pytest.raises(InitramfsError):
        img.add_node("/dev/x", "p", 1, 1)


def _fake_bzimage(payload: bytes, version: int = 0x20F) -> bytes:
    setup_sects = 3
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, version)
    struct.pack_into("<II", head, 0x248, 64, len(payload))
    return bytes(head) + bytes(64) + payload + b"\xaa\xbb\xcc\xdd"  # size word after payload


def test_vmlinux_from_xz_and_gzip_payloads(tmp_path):
    elf = b"\x7fELF" + bytes(range(200)) * 50
    for name, packed in (("xz", lzma.compress(elf, format=lzma.FORMAT_XZ)),
                         ("gz", gzip.compress(elf, mtime=0))):
        src = tmp_path / f"vmlinuz-{name}"
        src.write_bytes(_fake_bzimage(packed))
        out = image_kernel.extract_vmlinux(src, tmp_path / f"vmlinux-{name}")
        assert out.read_bytes() == elf
    plain = tmp_path / "vmlinux"
    plain.write_bytes(elf)
    assert image_kernel.vmlinux_bytes(plain) == elf


def test_vmlinux_errors_say_what_to_pass(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(4096))
    with pytest.raises(image_kernel.KernelImageError, match="--kernel"):
        image_kernel.vmlinux_bytes(bad)
    old = tmp_path / "old"
    old.write_bytes(_fake_bzimage(b"\xfd7zXZ\x00", version=0x206))
    with pytest.raises(image_kernel.KernelImageError, match="2.08"):
        image_kernel.vmlinux_bytes(old)


def _system_ls() -> Path:
    for path in ("/usr/bin/ls", "/bin/ls"):
        if Path(path).exists():
            return Path(path)
    pytest.skip("no /usr/bin/ls on this host")


def test_elf_dynamic_section_and_closure():
    ls = _system_ls()
    dyn = image_elf.dynamic(ls)
    assert "libc.so.6" in dyn.needed
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    pool = {f"/usr/lib/x86_64-linux-gnu/{p.name}": p.resolve()
            for p in libdir.glob("*.so*") if p.resolve().is_file()}
    found = image_elf.closure({"/usr/bin/ls": ls}, pool, ("/usr/lib/x86_64-linux-gnu",))
    assert "/usr/lib/x86_64-linux-gnu/libc.so.6" in found
    without_libc = {g: h for g, h in pool.items() if not g.endswith("/libc.so.6")}
    with pytest.raises(image_elf.ElfError, match="libc.so.6"):
        image_elf.closure({"/usr/bin/ls": ls}, without_libc, ("/usr/lib/x86_64-linux-gnu",))


def test_layout_rules():
    assert image_python.guest_path("/lib/x86_64-linux-gnu/libc.so.6") == \
        "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert image_python.guest_path("/bin/busybox") == "/usr/bin/busybox"
    assert image_python.guest_path("/etc/python3.11/x") == "/etc/python3.11/x"
    keep = image_python._keep_stdlib
    assert keep("/usr/lib/python3.11/json/decoder.py")
    assert not keep("/usr/lib/python3.11/test/test_json.py")
    assert not keep("/usr/lib/python3.11/idlelib/run.py")
    assert not keep("/usr/lib/python3.11/lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so")
    assert keep("/usr/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so")
    site = image_python._keep_site
    assert site(("numpy", "linalg", "__init__.py"))
    assert not site(("numpy", "linalg", "tests", "test_linalg.py"))
    assert not site(("numpy", "__init__.pyi"))
    assert not site(("..", "..", "..", "bin", "f2py"))
    assert site(("numpy-2.4.0.dist-info", "METADATA"))
    assert not site(("numpy-2.4.0.dist-info", "LICENSE.txt"))


def test_debs_names():
    assert debs.Pkg("busybox-static", "1:1.35.0-4", "amd64").filename == \
        "busybox-static_1%3a1.35.0-4_amd64.deb"
    assert debs.module_name("kernel/drivers/vfio/pci/vfio-pci.ko") == "vfio_pci"
    assert debs.module_name("kernel/net/core/failover.ko.xz") == "failover"


def _image(tmp_path, disk=False) -> Image:
    info = {"kernel": "vmlinux", "initramfs": "initramfs.cpio",
            "cmdline": "console=ttyS0 ukgpu.manifest=ab",
            "disks": {"root": "root.img", **({"model": "model.img"} if disk else {})},
            "sizes": {"initramfs": 12 << 20},
            "model": {"size": 500 << 20, "disk": disk}}
    for name in info["disks"].values():
        (tmp_path / name).write_bytes(b"disk")
    return Image(tmp_path, info)


def test_qemu_command_tcg_kvm_disk_and_append(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    cmd = qemu.qemu_command(_image(tmp_path), qemu.BootOptions(arena="1G", append=["ukgpu.ctx=64"]),
                            port=18080)
    text = " ".join(cmd)
    assert "-cpu max" in text and "tcg" in text and "-M q35" in text
    assert "hostfwd=tcp:127.0.0.1:18080-:8080" in text
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 ukgpu.manifest=ab ukgpu.ctx=64 ukgpu.arena=1G"
    assert cmd[cmd.index("-m") + 1] == "2048M"
    drives = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-drive"]
    assert drives == [f"if=none,id=root,file={tmp_path}/root.img,format=raw,readonly=on"]
    assert "virtio-blk-pci,drive=root,serial=ukgpu-root" in cmd
    kvm = qemu.qemu_command(_image(tmp_path, disk=True),
                            qemu.BootOptions(accel="kvm", mem="4G", cpus=4), port=1)
    assert kvm[kvm.index("-cpu") + 1] == "host" and kvm[kvm.index("-m") + 1] == "4G"
    assert f"if=none,id=model,file={tmp_path}/model.img,format=raw,readonly=on" in kvm
    assert kvm.index("virtio-blk-pci,drive=root,serial=ukgpu-root") < \
        kvm.index("virtio-blk-pci,drive=model,serial=ukgpu-model")
    partial = _image(tmp_path, disk=True)
    (tmp_path / "model.img").unlink()
    with pytest.raises(qemu.BootError, match="model.img is missing"):
        qemu.qemu_command(partial, qemu.BootOptions(), port=1)
    with pytest.raises(qemu.BootError, match="tcg"):
        qemu.qemu_command(_image(tmp_path), qemu.BootOptions(accel="hvf"), port=1)


def test_default_memory_covers_initramfs_and_model(tmp_path):
    assert qemu.default_mem_mib(_image(tmp_path)) == 2048  # 2 * 12 + 500 + 1024 = 1548
    big = _image(tmp_path, disk=True)
    big.info["model"]["size"] = 1800 << 20
    assert qemu.default_mem_mib(big) == 3072  # 2 * 12 + 1800 + 1024 = 2848, up to 256 MiB


def test_parse_ready_line():
    got = qemu.parse_ready(" total=9.10s boot_to_init=3.20s model_load=2.00s port=8080")
    assert got == {"total": 9.1, "boot_to_init": 3.2, "model_load": 2.0, "port": 8080.0}


def test_a_guest_kvm_cannot_run_fails_at_once_with_the_way_out(tmp_path, monkeypatch):
    """QEMU's 'KVM internal error' leaves the vCPU stopped: wait_ready says so instead of
    waiting out its timeout."""
    import sys
    import time

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    vm = qemu.Vm(_image(tmp_path), qemu.BootOptions(accel="kvm", verify=False))  # no record: not booted
    vm.command = [sys.executable, "-c", "import time; print('Linux version 6.1', flush=True); "
                  "print('KVM internal error. Suberror: 1', flush=True); "
                  "print('emulation failure', flush=True); time.sleep(60)"]
    vm.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(qemu.BootError, match="KVM could not run the guest.*--accel tcg"):
            vm.wait_ready(timeout=50)
        assert time.monotonic() - t0 < 20
    finally:
        vm.kill()


def test_wait_line_wakes_on_the_line_and_gives_up_when_qemu_exits(tmp_path, monkeypatch):
    """wait_line returns when the console prints the exact line (not a longer one that contains
    it), and raises with the console's tail as soon as QEMU exits without printing it."""
    import sys
    import time

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    vm = qemu.Vm(_image(tmp_path), qemu.BootOptions(verify=False))
    vm.command = [sys.executable, "-c", "import time; print('snapshot ready soon', flush=True); "
                  "time.sleep(0.3); print('snapshot ready', flush=True); time.sleep(1); "
                  "print('bye', flush=True)"]
    vm.start()
    try:
        t0 = time.monotonic()
        vm.wait_line("snapshot ready", 30)
        assert 0.25 < time.monotonic() - t0 < 10 and vm.log[-1] == "snapshot ready"
        with pytest.raises(qemu.BootError, match=r"did not print 'never'(.|\n)*bye"):
            vm.wait_line("never", 50)
        assert time.monotonic() - t0 < 20  # QEMU's exit ended the wait, not the timeout
    finally:
        vm.kill()
