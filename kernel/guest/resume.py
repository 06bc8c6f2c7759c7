"""A guest that can be snapshotted once and restored many times: sealed before the snapshot, given
fresh per-boot state after each restore.

The host (kernel/image/snapshot.py) boots an image cold, warms it up with one completion and types
`snapshot` on the serial console.  The guest then seals its API (every request, /health included,
gets 503 `restoring`), waits until no request is in flight and prints `SNAPSHOT-READY`; the host
pauses the VM and saves its state.  Every copy restored from that state starts with the
snapshot's memory: its wall clock stopped at the snapshot, its kernel's random pool, no API key.
So the restoring host types one line on the console,

    resume {"time_ns": <host wall clock>, "entropy": "<64 hex digits or more>", "api_key": ...}

and the guest sets its wall clock, mixes the entropy into the kernel's pool and forces the
kernel's generator to reseed from it (RNDRESEEDCRNG: no two restored copies share random numbers,
request ids or sampling seeds), installs the key, unseals and prints `READY ... restored=1`.

The console is the host's private channel (only the process that runs QEMU holds it, and the key
never appears in QEMU's arguments); the guest turns echo off on it so the key is not printed back.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import termios
import time
from dataclasses import dataclass

SNAPSHOT_READY = "SNAPSHOT-READY"
RNDRESEEDCRNG = 0x5207  # <linux/random.h>: _IO('R', 0x07)
MIN_ENTROPY = 32


@dataclass(frozen=True)
class Resume:
    time_ns: int
    entropy: bytes
    api_key: str | None


def parse_resume(payload: str) -> Resume:
    """The JSON after `resume `; ValueError saying what is wrong."""
    try:
        doc = json.loads(payload)
    except ValueError:
        raise ValueError("resume takes one JSON object: {\"time_ns\", \"entropy\", \"api_key\"}") from None
    if not isinstance(doc, dict) or set(doc) != {"time_ns", "entropy", "api_key"}:
        raise ValueError("resume takes exactly the keys time_ns, entropy and api_key")
    stamp, entropy, key = doc["time_ns"], doc["entropy"], doc["api_key"]
    if not isinstance(stamp, int) or isinstance(stamp, bool) or stamp <= 0:
        raise ValueError("time_ns must be the host's wall clock in nanoseconds")
    try:
        seed = bytes.fromhex(entropy)
    except (TypeError, ValueError):
        raise ValueError("entropy must be hex digits") from None
    if len(seed) < MIN_ENTROPY:
        raise ValueError(f"entropy must carry at least {MIN_ENTROPY} bytes")
    if key is not None and (not isinstance(key, str) or not key or not key.isprintable()):
        raise ValueError("api_key must be a printable string or null")
    return Resume(stamp, seed, key)


def quiet_console(stream=None) -> None:
    """Turn off echo on the console, `stream` (default: stdin), whose `resume` lines carry the API
    key; not a terminal: nothing to do."""
    try:
        fd = (stream or sys.stdin).fileno()
        attrs = termios.tcgetattr(fd)
    except (OSError, ValueError, AttributeError, termios.error):
        return
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def reseed(entropy: bytes, device: str = "/dev/urandom") -> None:
    """Mix `entropy` into the kernel's pool and make its generator reseed now (a write alone is
    only folded in at the next scheduled reseed)."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.write(fd, entropy)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def set_clock(time_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)


def seal(gate, in_flight, timeout: float = 30.0) -> bool:
    """Seal the API and wait for the requests already inside to finish; whether they did within
    `timeout` (the host then does not snapshot)."""
    gate.seal("the guest is being snapshotted or restored")
    deadline = time.monotonic() + timeout
    while in_flight() > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def take_over(gate, payload: str, policy_for) -> str | None:
    """Apply the host's `resume` line to a sealed guest: clock, entropy, the key's policy
    (`policy_for(key)`), then unseal.  None, or why it was refused (the gate stays as it was)."""
    if gate is None or not gate.sealed:
        return "resume ignored: this guest was not restored from a snapshot"
    try:
        got = parse_resume(payload)
    except ValueError as exc:
        return f"resume refused: {exc}"
    set_clock(got.time_ns)
    reseed(got.entropy)
    gate.set(policy_for(got.api_key))
    gate.unseal()
    return None
