"""The few system calls PID 1 needs, through ctypes: mount, finit_module, reboot; plus `ip`.

Standard library only: this runs in the guest before anything else is set up.
Network addresses are set with busybox `ip` (Debian's busybox-static is in
the image); everything else is a direct system call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from dataclasses import dataclass

from ukgpu.llama_core.errors import UkgpuError

_SYS_FINIT_MODULE = 313  # x86-64
_LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
BUSYBOX = "/usr/bin/busybox"

_libc = None


class InitError(UkgpuError):
    """A boot step failed; the guest prints the reason and powers off."""


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise InitError(f"{what} failed: {os.strerror(err)} (errno {err})")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """Mount unless something already is at `target` (stage 1 moves /dev, /proc, /sys in)."""
    if os.path.ismount(target):
        return
    os.makedirs(target, exist_ok=True)
    ret = libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                       data.encode() or None)
    if ret != 0 and ctypes.get_errno() == errno.EBUSY:
        return  # already mounted (devtmpfs can be auto-mounted)
    _check(ret, f"mount -t {fstype} {source} {target}")


def mount_basics() -> None:
    """/proc, /sys, /dev (devtmpfs), /dev/shm, /tmp and /run."""
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs", data="mode=0755")
    mount("tmpfs", "/dev/shm", "tmpfs", data="mode=1777")  # semaphores (numba, multiprocessing)
    mount("tmpfs", "/tmp", "tmpfs", data="mode=1777")
    mount("tmpfs", "/run", "tmpfs", data="mode=0755")


def writable_overlay(path: str, scratch: str = "/run/ukgpu-overlay") -> None:
    """Make the read-only directory `path` writable in RAM (overlayfs, a tmpfs upper layer): numba
    keeps its cache next to the sources and only reads it from a folder it could write to."""
    name = path.strip("/").replace("/", "_")
    upper, work = f"{scratch}/{name}/upper", f"{scratch}/{name}/work"
    os.makedirs(upper, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    ret = libc().mount(b"overlay", path.encode(), b"overlay", ctypes.c_ulong(0),
                       f"lowerdir={path},upperdir={upper},workdir={work}".encode())
    _check(ret, f"mount -t overlay (writable {path})")


def insmod(path: str) -> bool:
    """Load one module file; False when it was already loaded."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ret = libc().syscall(_SYS_FINIT_MODULE, fd, b"", 0)
    finally:
        os.close(fd)
    if ret != 0 and ctypes.get_errno() == errno.EEXIST:
        return False
    _check(ret, f"insmod {path}")
    return True


def kernel_messages(needle: str, limit: int = 4096) -> list[str]:
    """The kernel log's lines that contain `needle` (read once from /dev/kmsg, without waiting)."""
    found: list[str] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return found
    try:
        for _ in range(limit):
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten records: go on with the next ones
                    continue
                break
            text = record.partition(";")[2].strip()
            if needle in text:
                found.append(text)
    finally:
        os.close(fd)
    return found


def power_off() -> None:
    """Flush and power the machine off (never returns on success)."""
    try:
        os.sync()
    finally:
        libc().reboot(_LINUX_REBOOT_CMD_POWER_OFF)
    raise InitError(f"reboot(POWER_OFF) failed: {os.strerror(ctypes.get_errno())}")


def uptime() -> float:
    """Seconds since the kernel started (CLOCK_BOOTTIME)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class NetConfig:
    address: str  # CIDR, e.g. 10.0.2.15/24
    gateway: str | None
    device: str = "eth0"


def ip(*args: str) -> None:
    res = subprocess.run([BUSYBOX, "ip", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise InitError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")


def configure_network(net: NetConfig | None, timeout: float = 10.0) -> None:
    """Bring up lo and, unless net is None, one interface with a static address."""
    ip("link", "set", "lo", "up")
    if net is None:
        return
    deadline = time.monotonic() + timeout
    while not os.path.exists(f"/sys/class/net/{net.device}"):
        if time.monotonic() > deadline:
            found = ", ".join(sorted(os.listdir("/sys/class/net")))
            raise InitError(f"no network interface {net.device} (found: {found}); boot with "
                            "a virtio-net device, or set ip=...:<device>:off / ip=off")
        time.sleep(0.02)
    ip("addr", "add", net.address, "dev", net.device)
    ip("link", "set", net.device, "up")
    if net.gateway:
        ip("route", "add", "default", "via", net.gateway, "dev", net.device)
