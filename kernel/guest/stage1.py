"""The initramfs's /init: reach the verified root filesystem, then run the guest's init from it.

The initramfs is small (this file, Python, the modules below): everything else the guest runs
(the stdlib, site-packages, ukgpu, the numba cache, an embedded model) is an erofs filesystem on a
read-only virtio disk, under dm-verity: every 4 KiB block is checked against a hash tree on the
same disk, whose root hash comes from the kernel command line (the host's record of the image,
`kernel/image/trust.py`).  Nothing is unpacked or hashed up front; a block is checked when it
is first read, and a block that fails reads as an I/O error (a Python import fails, a mapped
page raises SIGBUS), which the guest's init turns into `FATAL` and a power-off.

Steps: mount /dev, /proc and /sys; insmod the modules listed in /etc/ukgpu/stage1-modules (virtio, dm,
dm-verity, erofs; dependencies first); find the disks by their virtio serial (`ukgpu-root`,
`ukgpu-model`); map each with a verity table (device-mapper ioctls on /dev/mapper/control); mount
the root read-only; move /dev, /proc and /sys into it, make it `/` and exec its /init (the guest's init,
kernel/guest/init.py), telling it when this stage started and how long it took.

Kernel command line:
  ukgpu.root=<blocks>:<root hash>:<salt>:<hash>         the root disk (erofs + tree)
  ukgpu.model_disk=<blocks>:<root hash>:<salt>:<hash>   a model on its own disk: /dev/ukgpu-model
  ukgpu.verify=off   the root mounted without verity and the model disk unchecked (only
                     `ukgpu boot --insecure-skip-verify` passes it; /health then says so)

Standard library only, no ukgpu imports: this file is copied into the initramfs on its own.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import time

ROOT_SERIAL, MODEL_SERIAL = "ukgpu-root", "ukgpu-model"
SERIALS = {"root": ROOT_SERIAL, "model": MODEL_SERIAL}  # a disk's role -> its virtio serial
MODEL_NODE = "/dev/ukgpu-model"
NEW_ROOT = "/newroot"
MODULE_LIST = "/etc/ukgpu/stage1-modules"
BLOCK = 4096
_MS_RDONLY, _MS_MOVE = 1, 8192
_SYS_FINIT_MODULE = 313  # x86-64
_LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC

# device-mapper's ioctl interface (linux/dm-ioctl.h, version 4)
_DM_HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")  # struct dm_ioctl: 312 bytes
_DM_TARGET = struct.Struct("=QQiI16s")  # struct dm_target_spec: 40 bytes
_DM_DEV_CREATE, _DM_DEV_SUSPEND, _DM_TABLE_LOAD = 3, 6, 9
_DM_READONLY_FLAG = 1


class StageError(Exception):
    """A step before the real root failed: the guest prints FATAL and powers off."""


def dm_request(cmd: int) -> int:
    """_IOWR(0xfd, cmd, struct dm_ioctl)."""
    return (3 << 30) | (_DM_HEADER.size << 16) | (0xFD << 8) | cmd


def dm_buffer(name: str, flags: int = 0, targets: list[tuple[int, int, str, str]] = ()) -> bytearray:
    """A dm_ioctl header for `name` followed by its target specs (start, sectors, type, params),
    each padded to 8 bytes; the kernel writes its answer into the same buffer."""
    payload = bytearray()
    for start, length, kind, params in targets:
        raw = params.encode() + b"\0"
        raw += b"\0" * (-(_DM_TARGET.size + len(raw)) % 8)
        payload += _DM_TARGET.pack(start, length, 0, _DM_TARGET.size + len(raw), kind.encode()) + raw
    size = _DM_HEADER.size + len(payload) + 4096  # room for the kernel's answer
    header = _DM_HEADER.pack(4, 0, 0, size, _DM_HEADER.size, len(targets), 0, flags, 0, 0, 0,
                             name.encode(), b"", b"")
    return bytearray(header + payload + bytes(size - _DM_HEADER.size - len(payload)))


def dm_dev(buffer: bytearray) -> int:
    """The `dev` field of an answered dm_ioctl (the mapped device's number)."""
    return _DM_HEADER.unpack_from(buffer)[10]


HASHES = ("blake2b-256", "sha256")  # kernel/image/verity.py HASHES


def verity_table(data_blocks: int, device: str, root_hash: str, salt: str,
                 algorithm: str = "blake2b-256") -> tuple[int, int, str, str]:
    """A verity target over `data_blocks` blocks of `device` (major:minor), the hash tree on the
    same device right after the data (format 1, 4 KiB blocks)."""
    return (0, data_blocks * (BLOCK // 512), "verity",
            f"1 {device} {device} {BLOCK} {BLOCK} {data_blocks} {data_blocks} {algorithm} {root_hash} {salt}")


def linear_table(data_blocks: int, device: str) -> tuple[int, int, str, str]:
    """The data blocks of `device` without checking (ukgpu.verify=off)."""
    return (0, data_blocks * (BLOCK // 512), "linear", f"{device} 0")


def parse_disk(word: str) -> tuple[int, str, str, str]:
    """`<blocks>:<root hash>:<salt>:<hash>` -> (blocks, root hash, salt, hash)."""
    try:
        blocks, root, salt, algorithm = word.split(":")
        int(root, 16), int(salt, 16)
        if int(blocks) <= 0 or len(root) != 64 or algorithm not in HASHES:
            raise ValueError
    except ValueError:
        raise StageError(f"bad disk description {word!r}: want <blocks>:<root hash>:<salt>:<hash>, "
                         f"hash one of {', '.join(HASHES)}") from None
    return int(blocks), root.lower(), salt.lower(), algorithm


def parse_cmdline(text: str) -> dict[str, str]:
    """The ukgpu.root / model_disk / verify words, each once (a second one is refused)."""
    found: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        if key in ("ukgpu.root", "ukgpu.model_disk", "ukgpu.verify"):
            if key in found:
                raise StageError(f"{key}= appears twice on the kernel command line: refusing to guess "
                                 "which one the host meant; boot with `ukgpu boot`")
            found[key] = value
    if "ukgpu.root" not in found:
        raise StageError("no ukgpu.root= on the kernel command line: boot the image with `ukgpu boot` "
                         "(its record carries the root disk's hash)")
    return found


_libc = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _call(name: str, *args) -> None:
    if getattr(_lib(), name)(*args) != 0:
        err = ctypes.get_errno()
        raise StageError(f"{name}{tuple(a.decode() if isinstance(a, bytes) else a for a in args)} failed: "
                         f"{os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    os.makedirs(target, exist_ok=True)
    _call("mount", source.encode(), target.encode(), fstype.encode() if fstype else None,
          ctypes.c_ulong(flags), data.encode() if data else None)


def insmod(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _lib().syscall(_SYS_FINIT_MODULE, fd, b"", 0) != 0 and ctypes.get_errno() != 17:  # EEXIST
            raise StageError(f"insmod {path} failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def find_disk(serial: str, timeout: float = 10.0) -> str | None:
    """`major:minor` of the virtio disk with this serial; None when none shows up in time (the
    disks are probed asynchronously after virtio_blk loads)."""
    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(os.listdir("/sys/block")):
            try:
                with open(f"/sys/block/{name}/serial") as f:
                    if f.read().strip() == serial:
                        with open(f"/sys/block/{name}/dev") as d:
                            return d.read().strip()
            except OSError:
                continue
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def dm_create(name: str, target: tuple[int, int, str, str]) -> int:
    """Create, load and resume a read-only mapping; its device number."""
    with open("/dev/mapper/control", "rb", buffering=0) as control:
        fd = control.fileno()
        buf = dm_buffer(name)
        try:
            fcntl.ioctl(fd, dm_request(_DM_DEV_CREATE), buf, True)
            fcntl.ioctl(fd, dm_request(_DM_TABLE_LOAD), dm_buffer(name, _DM_READONLY_FLAG, [target]), True)
            fcntl.ioctl(fd, dm_request(_DM_DEV_SUSPEND), dm_buffer(name), True)  # no SUSPEND flag: resume
        except OSError as exc:
            raise StageError(f"device-mapper refused the {target[2]} table of {name}: {exc.strerror} "
                             "(a damaged disk or a wrong root hash; see the kernel messages above)") from None
    return dm_dev(buf)


def map_disk(name: str, serial: str, word: str | None, verify: bool) -> int:
    """The verity (or, unverified, linear) mapping of the disk with `serial`; its device number."""
    device = find_disk(serial)
    if device is None:
        raise StageError(f"no virtio disk with serial {serial}: boot the image with `ukgpu boot`, which "
                         f"attaches it")
    blocks, root, salt, algorithm = parse_disk(word or "")
    with open(f"/sys/dev/block/{device}/size") as f:
        have = int(f.read()) * 512
    if have < blocks * BLOCK:
        raise StageError(f"disk {serial} has {have} bytes, less than the {blocks * BLOCK} of data its "
                         "record describes: a truncated or different disk; rebuild the image")
    target = verity_table(blocks, device, root, salt, algorithm) if verify else linear_table(blocks, device)
    return dm_create(name, target)


def wait_node(path: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise StageError(f"{path} did not appear")
        time.sleep(0.005)


def reach_root(cmdline: str) -> None:
    words = parse_cmdline(cmdline)
    verify = words.get("ukgpu.verify") != "off"
    with open(MODULE_LIST) as f:
        for path in f.read().split():
            insmod(path)
    dev = map_disk("ukgpu-root", ROOT_SERIAL, words["ukgpu.root"], verify)
    node = f"/dev/dm-{os.minor(dev)}"
    wait_node(node)
    try:
        mount(node, NEW_ROOT, "erofs", _MS_RDONLY)
    except StageError as exc:
        raise StageError(f"the root filesystem does not mount ({exc}): its disk failed its hash check "
                         "or is damaged; rebuild the image") from None
    if "ukgpu.model_disk" in words:
        dev = map_disk("ukgpu-model", MODEL_SERIAL, words["ukgpu.model_disk"], verify)
        wait_node(f"/dev/dm-{os.minor(dev)}")
        os.mknod(MODEL_NODE, 0o60444, dev)  # block device, read-only for everyone
    for mounted in ("/dev", "/proc", "/sys"):
        mount(mounted, NEW_ROOT + mounted, None, _MS_MOVE)
    os.chdir(NEW_ROOT)
    mount(".", "/", None, _MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def power_off() -> None:
    try:
        os.sync()
    finally:
        _lib().reboot(_LINUX_REBOOT_CMD_POWER_OFF)
    os._exit(1)


def main() -> None:
    start = time.clock_gettime(time.CLOCK_BOOTTIME)
    try:
        mount("devtmpfs", "/dev", "devtmpfs", 0, "mode=0755")
        mount("proc", "/proc", "proc")
        mount("sysfs", "/sys", "sysfs")
        with open("/proc/cmdline") as f:
            reach_root(f.read())
    except (StageError, OSError) as exc:
        print(f"ukgpu: FATAL: {type(exc).__name__}: {exc}", flush=True)
        power_off()
    took = time.clock_gettime(time.CLOCK_BOOTTIME) - start
    env = {**os.environ, "UKGPU_STAGE1_START": f"{start:.3f}", "UKGPU_STAGE1_SECONDS": f"{took:.3f}"}
    try:
        os.execve("/usr/bin/python3.11", ["/usr/bin/python3.11", "-IBu", "/init"], env)
    except OSError as exc:
        print(f"ukgpu: FATAL: cannot start the guest's init from the root filesystem: {exc}", flush=True)
        power_off()


if __name__ == "__main__":
    main()
