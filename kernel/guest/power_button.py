"""The ACPI power button: a press powers the guest off cleanly, as a drain or `virsh shutdown` asks.

A hypervisor asks a guest to stop by pressing its virtual power button (QEMU's
`system_powerdown`, KubeVirt's stop and node drains): the kernel's `button` driver turns the
ACPI event into a KEY_POWER press on an input device, which `evdev` exposes as
/dev/input/event<N>.  There is no acpid in the image; `watch` reads those devices from a daemon
thread and calls `on_press` once for the first press.

Input events are `struct input_event` (x86-64): a 16-byte timestamp, then u16 type, u16 code,
s32 value; a key press is type EV_KEY (1) with value 1.
"""

from __future__ import annotations

import glob
import os
import select
import struct
import threading
from collections.abc import Callable

EVENT = struct.Struct("@qqHHi")  # struct input_event on x86-64: timeval, type, code, value
EV_KEY, KEY_POWER = 0x01, 116
MODULES = ("button", "evdev")  # kernel modules the image ships for this


def is_power_press(raw: bytes) -> bool:
    """Whether one input_event record is a press of the power key."""
    _sec, _usec, kind, code, value = EVENT.unpack(raw)
    return kind == EV_KEY and code == KEY_POWER and value == 1


def _power_devices(pattern: str, sysfs: str) -> list[int]:
    """Open every input device that can send KEY_POWER (others would only be read in vain)."""
    fds = []
    for path in sorted(glob.glob(pattern)):
        caps = f"{sysfs}/{os.path.basename(path)}/device/capabilities/key"
        try:
            with open(caps) as f:
                words = f.read().split()
            bits = int(words[-1 - KEY_POWER // 64], 16) if len(words) > KEY_POWER // 64 else 0
            if not bits >> (KEY_POWER % 64) & 1:
                continue
            fds.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except (OSError, ValueError, IndexError):
            continue
    return fds


def watch(on_press: Callable[[], None], pattern: str = "/dev/input/event*",
          sysfs: str = "/sys/class/input") -> threading.Thread | None:
    """Call on_press (from a daemon thread) at the first power-button press; None when no input
    device has a power key (no ACPI: nothing to watch)."""
    fds = _power_devices(pattern, sysfs)
    if not fds:
        return None

    def run() -> None:
        while fds:
            ready, _, _ = select.select(fds, [], [])
            for fd in ready:
                try:
                    data = os.read(fd, EVENT.size * 64)
                except BlockingIOError:
                    continue
                if not data:  # the device went away
                    fds.remove(fd)
                    os.close(fd)
                for k in range(0, len(data) - EVENT.size + 1, EVENT.size):
                    if is_power_press(data[k:k + EVENT.size]):
                        on_press()
                        return

    thread = threading.Thread(target=run, name="ukgpu-power-button", daemon=True)
    thread.start()
    return thread
