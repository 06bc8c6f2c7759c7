"""Boot an image in QEMU (q35), stream its serial console, wait for READY, power it off.

    with Vm(load(DIR), BootOptions(port=0)) as vm:     # port 0: a free host port
        ready = vm.wait_ready()                        # {"total": 9.1, ...} from the READY line
        httpx.get(vm.url + "/health")
        vm.poweroff()                                  # serial command, then kill after a timeout

    Vm(image, opts, restore=snap)                      # from a saved state (kernel/image/snapshot.py)

The serial console is QEMU's stdin/stdout (a pipe, not a terminal); every
line is kept in `vm.log` and passed to `on_line`.  QEMU runs in its own
session, so a Ctrl-C reaches only the launcher, which then asks the guest to
power off.  Under TCG the CPU model is `max` (numpy's x86-64-v2+ kernels need
more than qemu64); with `--accel kvm` it is `host`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ukgpu.kernel.guest import stage1
from ukgpu.kernel.image import trust
from ukgpu.kernel.image.build import Image
from ukgpu.llama_core.errors import UkgpuError

MiB = 1 << 20
GUEST_PORT = 8080


class BootError(UkgpuError):
    """The guest did not come up, failed, or did not stop; carries the serial log tail."""


@dataclass
class BootOptions:
    port: int = 8080  # host port forwarded to the guest API; 0 picks a free one
    mem: str | None = None  # QEMU -m value, e.g. 2G; None: sized from the image
    cpus: int = 2
    accel: str = "tcg"  # tcg | kvm
    gpu: str | None = None  # PCI address of a GPU bound to vfio-pci on the host
    arena: str | None = None  # ukgpu.arena= for the guest, e.g. 2G
    append: list[str] = field(default_factory=list)  # extra kernel command line words
    api_key: str | None = None  # ukgpu.api_key= for the guest: its API then needs this key
    verify: bool = True  # False: boot without the host's record and the guest's check (said on /health)
    qemu: str = "qemu-system-x86_64"
    extra_args: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_mem_mib(image: Image) -> int:
    """RAM for the guest: the initramfs twice (archive + unpacked), room for the model's page
    cache (on either disk) and 1 GiB for Python, numpy and the arena; rounded up to 256 MiB."""
    sizes = image.info["sizes"]
    need = 2 * sizes["initramfs"] + image.info["model"]["size"] + 1024 * MiB
    return max(2048, math.ceil(need / (256 * MiB)) * 256)


def disk_args(image: Image) -> list[str]:
    """The image's read-only disks (root, and a model disk), each named by its virtio serial."""
    args = []
    for role, name in sorted(image.info.get("disks", {}).items(), key=lambda kv: kv[0] != "root"):
        path = image.dir / name
        if not path.is_file():
            raise BootError(f"{path} is missing: not a complete image; rebuild it with `ukgpu image build`")
        file = str(path).replace(",", ",,")  # QEMU's option syntax doubles commas
        args += ["-drive", f"if=none,id={role},file={file},format=raw,readonly=on",
                 "-device", f"virtio-blk-pci,drive={role},serial={stage1.SERIALS[role]}"]
    return args


_HOST_KEYS = ("ukgpu.manifest", "ukgpu.verify")  # set from the host's record only, never by --append


def qemu_command(image: Image, opts: BootOptions, port: int, boot: trust.Verified | None = None,
                 *, key_on_cmdline: bool = True) -> list[str]:
    """QEMU's arguments.  With `boot` (what `trust.verify_for_boot` checked) the kernel, initramfs
    and command line are the verified copies and the host's record; without, the image folder's
    own (`Vm` only does that when opts.verify is False, and then tells the guest).  opts.api_key
    goes on the guest's command line unless key_on_cmdline is False (a restore sends it over the
    console instead: QEMU's arguments are visible to every user of the host)."""
    if opts.accel not in ("tcg", "kvm"):
        raise BootError(f"--accel {opts.accel}: use tcg (emulation, works anywhere) or kvm")
    if shutil.which(opts.qemu) is None:
        raise BootError(f"{opts.qemu} is not installed: apt-get install qemu-system-x86 "
                        "(or run tools/dev/host_deps.sh)")
    accel = ["-accel", "kvm", "-cpu", "host"] if opts.accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", "max"]
    for word in opts.append:
        if word.partition("=")[0] in _HOST_KEYS:
            raise BootError(f"--append {word}: {word.partition('=')[0]} comes from the host's record of "
                            "the image only; to boot without the image check use --insecure-skip-verify")
    cmdline = [boot.cmdline if boot else image.info["cmdline"], *opts.append]
    if not opts.verify:
        cmdline.append("ukgpu.verify=off")
    elif boot is not None:  # the boot files were hashed against the host's record
        cmdline.append("ukgpu.verify=host")
    if opts.arena:
        cmdline.append(f"ukgpu.arena={opts.arena}")
    if opts.api_key and key_on_cmdline:
        if not opts.api_key.isprintable() or any(c.isspace() or c == '"' for c in opts.api_key):
            raise BootError("the API key must be printable, without spaces or quotes: it is "
                            "passed on the guest's kernel command line")
        cmdline.append(f"ukgpu.api_key={opts.api_key}")
    cmd = [opts.qemu, "-M", "q35", *accel, "-smp", str(opts.cpus),
           "-m", opts.mem or f"{default_mem_mib(image)}M",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-no-reboot",
           "-kernel", str(boot.kernel if boot else image.dir / image.info["kernel"]),
           "-initrd", str(boot.initramfs if boot else image.dir / image.info["initramfs"]),
           "-append", " ".join(cmdline),
           "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_PORT}",
           "-device", "virtio-net-pci,netdev=n0,romfile=",
           "-device", "virtio-rng-pci"]
    cmd += disk_args(image)
    if opts.gpu:
        cmd += _vfio_args(opts.gpu)
    return cmd + opts.extra_args


def _vfio_args(bdf: str) -> list[str]:
    try:
        from ukgpu.gpu.vfio.passthrough import qemu_vfio_args
    except ImportError as exc:
        raise BootError(f"--gpu needs ukgpu.gpu.vfio.passthrough, which cannot be imported: {exc}") \
            from exc
    return qemu_vfio_args(bdf)


_READY = re.compile(r"^READY\b(.*)$")
# What QEMU prints when KVM cannot run the guest; the vCPU then stops for good, so waiting for
# READY would only run into the timeout.
_KVM_FAILED = ("KVM internal error", "KVM: entry failed", "emulation failure")
KVM_HINT = ("KVM could not run the guest (often nested virtualization that lacks an "
            "instruction the kernel uses): boot with --accel tcg")


def qmp(path: str, *commands: dict | str, timeout: float = 30.0) -> list[dict]:
    """Run QMP commands (a name, or {"execute": ..., "arguments": ...}) on QEMU's socket at
    `path`; their answers.  BootError when QEMU refuses one."""
    answers = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        replies = sock.makefile("rb")
        replies.readline()  # the greeting
        for command in ("qmp_capabilities", *commands):
            request = {"execute": command} if isinstance(command, str) else command
            sock.sendall(json.dumps(request).encode() + b"\n")
            while True:  # skip asynchronous events until the command's answer
                answer = json.loads(replies.readline())
                if "return" in answer or "error" in answer:
                    break
            if "error" in answer:
                raise BootError(f"QEMU refused {request['execute']}: {answer['error']}")
            answers.append(answer["return"])
    return answers[1:]


@dataclass(frozen=True)
class Restore:
    """A saved guest state to start from instead of booting (kernel/image/snapshot.py): the host's
    record holds the SHA-256 of each `chunk`-byte piece of the file, and `image` is the digest of
    the image it was taken from."""

    state: Path
    chunk: int
    chunks: tuple[str, ...]
    image: str


class Vm:
    def __init__(self, image: Image, opts: BootOptions | None = None,
                 on_line: Callable[[str], None] | None = None, restore: Restore | None = None) -> None:
        self.image = image
        self.opts = opts or BootOptions()
        self.restore = restore
        self.port = self.opts.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.on_line = on_line
        self.log: list[str] = []
        self.ready: dict[str, float] | None = None
        self.fatal: str | None = None
        self._ready_event = threading.Event()
        self._new_line = threading.Condition()  # notified for each console line and at QEMU's exit
        # the host's record, not the folder, says what boots (kernel/image/trust.py)
        self.boot = trust.verify_for_boot(image.dir) if self.opts.verify else None
        try:
            if restore is not None and (self.boot is None or restore.image != self.boot.digest):
                raise BootError("the snapshot was taken from another image (or this boot skips the "
                                "host's record): boot cold, or take one with `ukgpu image snapshot`")
            self.command = qemu_command(image, self.opts, self.port, self.boot,
                                        key_on_cmdline=restore is None)  # a restore: over the console
        except BaseException:
            self._cleanup()
            raise
        # QEMU's machine protocol (QMP) on a private socket: press_power_button() uses it
        self._qmp_dir = tempfile.mkdtemp(prefix="ukgpu-qmp-")
        self.qmp_path = os.path.join(self._qmp_dir, "qmp.sock")
        self.command += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.started_at = 0.0

    def start(self) -> Vm:
        self.started_at = time.monotonic()
        if self.restore is None:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        else:  # paused (-S) until the state QEMU reads from the pipe matches the host's record
            incoming, feed = os.pipe()
            try:
                self.proc = subprocess.Popen(
                    [*self.command, "-S", "-incoming", f"fd:{incoming}"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                    pass_fds=(incoming,))
            except BaseException:
                os.close(feed)  # no QEMU to feed: the write end goes too
                raise
            finally:
                os.close(incoming)
            threading.Thread(target=self._resume_from, args=(feed,), name="ukgpu-restore",
                             daemon=True).start()
        self._reader = threading.Thread(target=self._read, name="ukgpu-serial", daemon=True)
        self._reader.start()
        return self

    def _resume_from(self, feed: int) -> None:
        """Stream the saved state into QEMU, each piece checked against the host's record before
        QEMU reads it; then run the guest and give it its own clock, entropy and API key
        (kernel/guest/resume.py)."""
        assert self.restore is not None
        try:
            bad = _pump_verified(self.restore, feed)
            if bad is not None:
                self._fail(f"the snapshot {self.restore.state} does not match the host's record "
                           f"({bad}): it was changed after it was taken, and the guest was not started. "
                           "Take it again with `ukgpu image snapshot`, or boot with --cold")
                return
            self._wait_loaded()
            qmp(self.qmp_path, "cont")
            self.send("resume " + json.dumps({"time_ns": time.time_ns(), "entropy": os.urandom(32).hex(),
                                              "api_key": self.opts.api_key}))
        except (OSError, BootError) as exc:
            self._fail(f"restoring the snapshot failed: {exc}")

    def _wait_loaded(self, timeout: float = 120.0) -> None:
        """Until QEMU has loaded the whole state (the VM is then paused)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = qmp(self.qmp_path, "query-status")[0]["status"]
            except (FileNotFoundError, ConnectionRefusedError):
                status = "starting"
            if status in ("paused", "prelaunch"):
                return
            if status not in ("inmigrate", "starting"):
                raise BootError(f"QEMU could not load the snapshot (status {status})")
            if self.proc is None or self.proc.poll() is not None:
                raise BootError("QEMU exited while loading the snapshot")
            time.sleep(0.02)
        raise BootError(f"QEMU did not load the snapshot within {timeout:.0f}s")

    def _fail(self, reason: str) -> None:
        self.fatal = reason
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._ready_event.set()

    def wait_line(self, text: str, timeout: float) -> None:
        """Block until the console shows a line equal to `text`; BootError when it does not."""
        deadline = time.monotonic() + timeout
        seen, waiting = 0, True
        while waiting:
            with self._new_line:
                if text in self.log[seen:]:
                    return
                seen = len(self.log)
                left = deadline - time.monotonic()
                waiting = left > 0 and self.proc is not None and self.proc.poll() is None
                if waiting:  # woken by the reader; the bound re-checks QEMU
                    self._new_line.wait(min(left, 0.5))
        if self._reader is not None and self.proc is not None and self.proc.poll() is not None:
            self._reader.join(timeout=2)  # what QEMU printed before it exited, to the last line
        if text not in self.log[seen:]:
            raise BootError(f"the guest did not print {text!r}; serial console:\n{self.tail()}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._new_line:
                self.log.append(line)
                self._new_line.notify_all()
            if self.on_line:
                self.on_line(line)
            match = _READY.match(line)
            if match:
                self.ready = parse_ready(match.group(1))
                self.ready["host_seconds"] = time.monotonic() - self.started_at
                self._ready_event.set()
            elif "ukgpu: FATAL:" in line:
                self.fatal = line.split("ukgpu: FATAL:", 1)[1].strip()
            elif self.fatal is None and line.startswith(_KVM_FAILED):
                self.fatal = f"{KVM_HINT} (QEMU: {line.strip()})"
                self._ready_event.set()  # stuck for good: stop waiting now
        self._ready_event.set()  # QEMU exited: nobody waits for READY any longer
        with self._new_line:
            self._new_line.notify_all()

    @property
    def serial_log(self) -> str:
        return "\n".join(self.log)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log[-lines:])

    def wait_ready(self, timeout: float = 300.0) -> dict[str, float]:
        """Block until READY; BootError (with the console tail) if the guest died or hung."""
        if not self._ready_event.wait(timeout):
            raise BootError(f"no READY after {timeout:.0f}s; serial console so far:\n{self.tail()}")
        if self.ready is None:
            why = f"the guest failed: {self.fatal}" if self.fatal else "QEMU exited before READY"
            raise BootError(f"{why}; serial console:\n{self.tail()}")
        return self.ready

    def send(self, line: str) -> None:
        """Type a line on the guest's serial console."""
        if self.proc and self.proc.stdin and self.proc.poll() is None:
            try:
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        """Remove the private copies of the boot files and the QMP socket (QEMU has exited)."""
        if self.boot is not None:
            self.boot.cleanup()
        if getattr(self, "_qmp_dir", None):
            shutil.rmtree(self._qmp_dir, ignore_errors=True)

    def press_power_button(self, timeout: float = 10.0) -> None:
        """Press the guest's ACPI power button (QMP `system_powerdown`), as a hypervisor asking a
        guest to stop does; the guest then powers off cleanly (wait() for it)."""
        qmp(self.qmp_path, "system_powerdown", timeout=timeout)

    def poweroff(self, timeout: float = 30.0) -> int:
        """Ask the guest to power off; kill QEMU if it is still running after `timeout`."""
        if self.proc is None:
            return 0
        self.send("poweroff")
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BootError(f"the guest did not power off within {timeout:.0f}s and was killed; "
                            f"serial console:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is None or self.proc.poll() is not None:
            self._cleanup()

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.poweroff(timeout=20)
            except BootError:
                pass
        self.kill()


def _pump_verified(restore: Restore, fd: int) -> str | None:
    """Write the state file into `fd` piece by piece, each only after its SHA-256 matched the
    record (QEMU never reads a byte that was not checked; the bytes checked are the bytes written),
    then close `fd`.  None, or which piece differs."""
    expected = restore.chunks
    try:
        count = 0
        for count, piece in enumerate(trust.read_pieces(restore.state, restore.chunk), 1):
            if count > len(expected):
                return "it is longer than recorded"
            if hashlib.sha256(piece).hexdigest() != expected[count - 1]:
                return f"piece {count - 1} of {len(expected)} differs"
            while piece:
                piece = piece[os.write(fd, piece):]
        if count < len(expected):  # the file ends early
            return f"piece {count} of {len(expected)} differs"
    finally:
        os.close(fd)
    return None


def parse_ready(text: str) -> dict[str, float]:
    """'total=9.10s model_load=2.00s port=8080' -> {'total': 9.1, 'model_load': 2.0, 'port': 8080}."""
    out: dict[str, float] = {}
    for key, value in re.findall(r"(\w+)=([0-9.]+)s?\b", text):
        out[key] = float(value)
    return out
