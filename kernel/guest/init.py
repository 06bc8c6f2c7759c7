"""PID 1 of the ukgpu guest: from the verified root filesystem to a serving HTTP API, or a clean poweroff.

Stage 1 (kernel/guest/stage1.py, the initramfs's /init) has mapped the root disk through dm-verity,
mounted it and exec'd this file from it: every block of it (and of a model disk) is checked by the
kernel as it is read.  This process then forks: the child boots and serves, PID 1 waits for it, and
when the child dies (a block that fails its hash check reads as an I/O error, or as SIGBUS in a
memory-mapped page) prints `FATAL` with the kernel's verity messages and powers off.

Steps, each timed and reported on the serial console:
 1. mount /tmp, /run, /dev/shm (stage 1 moved /dev, /proc and /sys in)
 2. read the kernel command line (`BootConfig.parse`)
 3. load the manifest (digest from `ukgpu.manifest=`) and check the model path against it
 4. insmod the image's kernel modules in dependency order; a RAM layer over ukgpu's read-only
    folders, where numba's cache lives
 5. network: `ip=` (kernel syntax) or QEMU user-net's 10.0.2.15/24 via 10.0.2.2
 6. the host arena (`ukgpu.arena=`, or sized from the model and context)
 7. the model (memory-mapped) and a backend: a GPU when one is found and usable, else CPU
 8. the HTTP API; then `READY ...` with the timings

Snapshots (kernel/guest/resume.py): `snapshot` on the console seals the API and prints
`SNAPSHOT-READY` for the host to save the VM; a restored copy gets `resume {...}` (wall clock,
entropy, API key) and prints `READY restored=1 ...`.

Shutdown: the line `poweroff` on the serial console (`stacks` there prints every
thread's stack), or the ACPI power button (QEMU's `system_powerdown`, a KubeVirt stop or a
node drain), watched from step 4 on.  Only the process that runs QEMU holds the console; the API port
has no shutdown route, since whatever can reach that port (the host's browser
included, through the 127.0.0.1 port forward) must not be able to power the guest off.
Any failure prints `ukgpu: FATAL: <reason>` and powers off: the guest never hangs.

Kernel command line keys (all optional but ukgpu.manifest):
  ukgpu.manifest=<sha256>  ukgpu.arena=<size>  ukgpu.port=8080  ukgpu.ctx=<tokens>
  ukgpu.slots=<n>  ukgpu.model=<path>  ukgpu.backend=auto|cpu|cuda  ukgpu.verify=full|host|off
  ukgpu.cpu_activations=f32|q8  (the CPU backend's products: exact, or on 8-bit activation
  blocks as llama.cpp rounds them; see llama_core/cpu/backend.py)
  ukgpu.gpu_selftest=on|off  (on: a GPU serves only after its kernels pass the boot self-test,
  else the CPU serves and READY says why; see kernel/guest/engine_setup.py)
  ukgpu.api_key=<key>  (the API then needs `Authorization: Bearer <key>`; see kernel/api/security.py)
  ukgpu.allowed_hosts=<name>,<name>  (Host header names accepted besides local ones: the names a
  Service or gateway in front of the guest is reached by)
  ukgpu.max_connections=<n>  ukgpu.header_timeout=<s>  ukgpu.body_timeout=<s>  ukgpu.keep_alive=<s>
  (connection limits, kernel/api/limits.py ServerLimits; defaults suit a small VM)
  ip=<addr>::<gw>:<netmask>::<dev>:off | ip=off
"""

from __future__ import annotations

import faulthandler
import ipaddress
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ukgpu.kernel import manifest
from ukgpu.kernel.guest import power_button, resume
from ukgpu.kernel.guest import syscalls as init_sys
from ukgpu.kernel.guest.syscalls import InitError, NetConfig

DEFAULT_NET = NetConfig("10.0.2.15/24", "10.0.2.2", "eth0")
UKGPU_DIR = "/usr/lib/python3/dist-packages/ukgpu"  # numba's cache sits in its __pycache__ folders
MiB = 1 << 20


def say(message: str) -> None:
    print(f"ukgpu: {message}", flush=True)


@dataclass
class BootConfig:
    manifest_sha256: str | None = None
    arena: str | None = None  # a size like 2G; None: sized from the model
    port: int = 8080
    ctx: int = 2048
    slots: int = 2
    model: str | None = None  # override the manifest's model path
    backend: str = "auto"
    verify: str = "full"
    gpu_selftest: str = "on"
    cpu_activations: str = "f32"
    net: NetConfig | None = DEFAULT_NET
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, cmdline: str) -> BootConfig:
        """Every word once: a second ukgpu.manifest= or ukgpu.verify= (e.g. appended after the host's
        own) is refused, never taken as an override."""
        cfg, seen = cls(), set()
        for word in cmdline.split():
            key, _, value = word.partition("=")
            if key in ("ukgpu.manifest", "ukgpu.verify") and key in seen:
                raise InitError(f"{key}= appears twice on the kernel command line: refusing to guess "
                                "which one the host meant; boot with `ukgpu boot`")
            seen.add(key)
            try:
                cfg._set(key, value)
            except ValueError as exc:
                raise InitError(f"bad kernel command line parameter {word!r}: {exc}") from None
        return cfg

    def _set(self, key: str, value: str) -> None:
        if key == "ip":
            self.net = parse_ip(value)
        elif not key.startswith("ukgpu."):
            return
        name = key.removeprefix("ukgpu.")
        if name == "manifest":
            self.manifest_sha256 = value.lower()
        elif name == "arena":
            self.arena = value
        elif name in ("port", "ctx", "slots"):
            if int(value) <= 0:
                raise ValueError("must be a positive integer")
            setattr(self, name, int(value))
        elif name == "backend" and value not in ("auto", "cpu", "cuda"):
            raise ValueError("use auto, cpu or cuda")
        elif name == "verify" and value not in ("full", "host", "off"):
            raise ValueError("use full, host or off")
        elif name == "gpu_selftest" and value not in ("on", "off"):
            raise ValueError("use on or off")
        elif name == "cpu_activations" and value not in ("f32", "q8"):
            raise ValueError("use f32 (exact) or q8 (8-bit activation blocks, integer products)")
        elif name in ("model", "backend", "verify", "gpu_selftest", "cpu_activations"):
            setattr(self, name, value)
        elif key.startswith("ukgpu."):
            self.extra[name] = value


def parse_ip(value: str) -> NetConfig | None:
    """Kernel `ip=` syntax: client::gw:netmask:hostname:device:autoconf (static only), or off."""
    if value in ("off", "none"):
        return None
    fields = value.split(":") + [""] * 7
    client, _server, gw, mask, _host, device = fields[:6]
    if not client or fields[6] not in ("", "off", "none"):
        raise ValueError("ukgpu configures static addresses only: ip=<addr>::<gw>:<mask>::<dev>:off")
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask or '255.255.255.0'}").prefixlen
    ipaddress.IPv4Address(client)
    if gw:
        ipaddress.IPv4Address(gw)
    return NetConfig(f"{client}/{prefix}", gw or None, device or "eth0")


_FROM_CMDLINE = object()


def api_policy(cfg: BootConfig, api_key=_FROM_CMDLINE):
    """The API's key (`ukgpu.api_key=`, or the one a restore brought) and Host names: clients
    through QEMU's port forward send a local name (127.0.0.1:<host port>); `ukgpu.allowed_hosts=`
    adds the names a Service or gateway uses."""
    from ukgpu.kernel.api import security

    names = [n for n in cfg.extra.get("allowed_hosts", "").split(",") if n]
    key = cfg.extra.get("api_key") if api_key is _FROM_CMDLINE else api_key
    return security.policy_for("0.0.0.0", key, allowed_hosts=names)


def arena_size(cfg: BootConfig, n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """The arena: what the user asked for, else the KV caches of all slots plus 25% + 64 MiB."""
    if cfg.arena is not None:
        from ukgpu.kernel.guest.arena import parse_size  # numpy: imported only after the image check

        return parse_size(cfg.arena)
    kv = 2 * n_layers * cfg.ctx * n_kv_heads * head_dim * 4 * cfg.slots  # K and V, float32
    return kv + kv // 4 + 64 * MiB


def stage1_times(env, t_init: float) -> dict[str, float]:
    """boot_to_init (kernel start to stage 1), root (stage 1: modules, verity, mount) and
    python_start (exec to this file running); without stage 1, boot_to_init only."""
    try:
        start, took = float(env["UKGPU_STAGE1_START"]), float(env["UKGPU_STAGE1_SECONDS"])
    except (KeyError, ValueError):
        return {"boot_to_init": t_init}
    return {"boot_to_init": start, "root": took, "python_start": max(0.0, t_init - start - took)}


def prefetch(path: str, chunk: int = 1 << 20) -> threading.Thread:
    """Read `path` once in a background thread: the kernel checks its blocks (dm-verity) on the
    other vCPU while this one imports Python modules, and the loader then reads from the page
    cache.  A read error just ends the thread: the loader's own read reports it."""

    def run() -> None:
        buf = bytearray(chunk)
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        except OSError:
            pass

    thread = threading.Thread(target=run, name="ukgpu-prefetch", daemon=True)
    thread.start()
    return thread


def disk_reads(sys_block: str = "/sys/block") -> dict[str, int]:
    """Bytes read so far from each device-mapper disk, by its name (ukgpu-root, ukgpu-model):
    under dm-verity every one of them was hashed by the kernel."""
    out: dict[str, int] = {}
    try:
        names = sorted(n for n in os.listdir(sys_block) if n.startswith("dm-"))
    except OSError:
        return out
    for name in names:
        try:
            with open(f"{sys_block}/{name}/dm/name") as f:
                label = f.read().strip()
            with open(f"{sys_block}/{name}/stat") as f:
                out[label] = int(f.read().split()[2]) * 512  # sectors read
        except (OSError, ValueError, IndexError):
            continue
    return out


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK) and not os.statvfs(path).f_flag & os.ST_RDONLY


def ready_line(total: float, times: dict[str, float], port: int, backend_note: str) -> str:
    """`READY total=9.10s <step>=<s>... port=8080 backend=cuda (GPU 0: ...)`: the timings
    `kernel.image.qemu.parse_ready` reads, then which backend serves and why (last: free text)."""
    shown = " ".join(f"{k}={v:.2f}s" for k, v in times.items())
    return f"READY total={total:.2f}s {shown} port={port} backend={backend_note}"


class Guest:
    """The boot sequence; each step records its duration in `self.times`."""

    def __init__(self, t_init: float | None = None) -> None:
        self.t_init = init_sys.uptime() if t_init is None else t_init
        self.times: dict[str, float] = stage1_times(os.environ, self.t_init)
        self.cfg = BootConfig()
        self.doc: dict = {}
        self.server: Any = None  # uvicorn.Server, once the API runs
        self.app: Any = None  # the API (counts requests in flight)
        self.gate: Any = None  # its security.Gate: sealed around a snapshot
        self.backend_note = ""

    def step(self, name: str, fn, *args):
        start = time.monotonic()
        result = fn(*args)
        self.times[name] = time.monotonic() - start
        say(f"{name} done in {self.times[name]:.2f}s")
        return result

    def boot(self) -> None:
        self.step("mount", init_sys.mount_basics)
        with open("/proc/cmdline") as f:
            self.cfg = BootConfig.parse(f.read())
        self.step("verify", self.verify_image)
        prefetch(self.model_file())
        self.step("modules", self.load_modules)
        power_button.watch(lambda: self.shutdown("the ACPI power button"))
        self.step("network", init_sys.configure_network, self.cfg.net)
        engine, arena, backend_note = self.step("model_load", self.load_model)
        self.step("http", self.start_api, engine, arena)
        read = disk_reads()
        if read:
            shown = ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in read.items())
            say(f"read from the verified disks before READY: {shown}")
        say(f"backend {backend_note}")
        self.backend_note = backend_note
        print(ready_line(init_sys.uptime(), self.times, self.cfg.port, backend_note), flush=True)
        serial_commands(self)

    def verify_image(self) -> None:
        """The manifest (its digest from the command line) and the model path; the bytes are the
        kernel's job: the root and model disks are dm-verity mappings made by stage 1."""
        self.doc = manifest.load(manifest.GUEST_PATH, self.cfg.manifest_sha256)
        model, on_disk = self._check_model_path()
        if self.cfg.verify == "off":
            say("image check skipped (ukgpu.verify=off): the disks were mapped without dm-verity")
            return
        where = "its own verity disk" if on_disk else "the root disk"
        say(f"image verified block by block as it is read: root on dm-verity ({len(self.doc['files'])} files "
            f"pinned by the manifest), model {model} on {where}")

    def _check_model_path(self) -> tuple[str, bool]:
        """The model's path, and whether it is the model disk; ManifestError unless it is the
        image's own model."""
        model = self.model_file()
        disk = bool(self.doc["model"].get("disk")) and model == self.doc["model"]["path"]
        if model not in self.doc["files"] and not disk:
            raise manifest.ManifestError(f"ukgpu.model={model} is not a file of the image's manifest: "
                                         "only the image's own model is served (or boot without the "
                                         "check: ukgpu boot --insecure-skip-verify)")
        return model, disk

    def model_file(self) -> str:
        return self.cfg.model or self.doc["model"]["path"]

    def load_modules(self) -> None:
        for path in self.doc["modules"]:
            init_sys.insmod(path)
        if not _writable("/"):
            init_sys.writable_overlay(UKGPU_DIR)

    def load_model(self):
        from ukgpu.kernel.guest.engine_setup import load

        return load(self.model_file(), self.cfg, arena_size)

    def start_api(self, engine, arena) -> None:
        import uvicorn

        from ukgpu.kernel.api import security
        from ukgpu.kernel.api.app import create_app
        from ukgpu.kernel.api.limits import server_limits_from
        from ukgpu.kernel.api.server import config

        try:
            limits = server_limits_from(self.cfg.extra)
        except ValueError as exc:
            raise InitError(f"bad kernel command line parameter: {exc}") from None

        self.gate = security.Gate(api_policy(self.cfg))
        checked = {"image_verified": self.cfg.verify != "off"}  # on every /health answer
        self.app = create_app(engine, model_id=self.doc["model"]["name"], arena=arena,
                              policy=self.gate, health_extra=checked)
        self.server = uvicorn.Server(config(self.app, "0.0.0.0", self.cfg.port, "warning", limits))
        thread = threading.Thread(target=self.server.run, name="ukgpu-http", daemon=True)
        thread.start()
        while not self.server.started:
            if not thread.is_alive():
                raise InitError(f"the HTTP server did not start on port {self.cfg.port}")
            time.sleep(0.01)

    def snapshot(self) -> None:
        """Seal the API for the host's snapshot; SNAPSHOT-READY once no request is in flight."""
        if self.cfg.extra.get("api_key"):
            say("snapshot refused: this guest's API key is on its kernel command line, and every "
                "restored copy would share it; snapshot a guest booted without one")
        elif resume.seal(self.gate, lambda: self.app.in_flight):
            print(resume.SNAPSHOT_READY, flush=True)
        else:
            self.gate.unseal()
            say("snapshot refused: requests were still running after 30 s")

    def resume(self, payload: str) -> None:
        """A restored copy's own clock, entropy and API key, then READY."""
        start = time.monotonic()
        refused = resume.take_over(self.gate, payload, lambda key: api_policy(self.cfg, key))
        if refused:
            say(refused)
            return
        self.app.metrics.reset()
        took = time.monotonic() - start
        print(f"READY restored=1 resume={took:.2f}s port={self.cfg.port} backend={self.backend_note}",
              flush=True)

    def shutdown(self, reason: str) -> None:
        say(f"powering off: {reason}")
        if self.server is not None:
            self.server.should_exit = True
            time.sleep(0.3)
        init_sys.power_off()


def serial_commands(guest: Guest) -> None:
    """Read commands from the console until `poweroff` (EOF: keep serving).

    `stacks` prints every thread's Python stack (what is the guest doing?); `snapshot` and
    `resume {...}` are the host's side of kernel/guest/resume.py."""
    resume.quiet_console()
    for line in sys.stdin:
        command, _, payload = line.strip().partition(" ")
        if command == "poweroff":
            guest.shutdown("poweroff on the serial console")
        elif command == "stacks":
            faulthandler.dump_traceback(all_threads=True)
        elif command == "snapshot":
            guest.snapshot()
        elif command == "resume":
            guest.resume(payload)
        elif command:
            say(f"unknown console command {command!r}: use poweroff or stacks")
    while True:
        time.sleep(3600)


def main(t_init: float | None = None) -> None:
    """The guest's life; `t_init` is the uptime when /init started (before any import).  As PID 1
    it supervises: the guest runs in a child, and its death powers the machine off with a reason."""
    supervised = os.getpid() == 1
    if supervised:
        child = os.fork()
        if child:
            supervise(child)
    run_guest(t_init, supervised)


def run_guest(t_init: float | None, supervised: bool = False) -> None:
    """Boot and serve; on failure say why and end: under PID 1, by exiting (PID 1 adds the kernel's
    verity lines, if any, and powers off), else by powering off."""
    try:
        guest = Guest(t_init)
        say(f"init started {guest.t_init:.2f}s after boot")
        guest.boot()
    except BaseException as exc:  # never exit quietly: report, then power off
        if not isinstance(exc, (InitError, manifest.ManifestError)):
            traceback.print_exc()
        print(f"ukgpu: FATAL: {type(exc).__name__}: {exc}", flush=True)
        try:
            if not supervised:
                init_sys.power_off()
        finally:
            os._exit(1)


def supervise(child: int) -> None:
    """PID 1: reap every process until `child` (the guest) ends, then say why and power off."""
    status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child:
            break
    reason = death_reason(status, init_sys.kernel_messages("verity"))
    if reason:
        print(f"ukgpu: FATAL: {reason}", flush=True)
    init_sys.power_off()
    os._exit(1)


def death_reason(status: int, verity_lines: list[str]) -> str | None:
    """Why the guest process ended, for the console; None when it already said so (an exit
    after its own FATAL line)."""
    found = ("; the kernel reports: " + " | ".join(verity_lines[-3:])) if verity_lines else ""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in set(signal.Signals) else str(sig)
        why = (" (a page of the image or the model failed its dm-verity hash check)"
               if sig == signal.SIGBUS and verity_lines else "")
        return f"the guest process was killed by {name}{why}{found}; refusing to serve"
    if verity_lines:
        return f"the guest process ended after a failed block check{found}; refusing to serve"
    return None


if __name__ == "__main__":
    main()
