"""The guest's ACPI power-button watcher (kernel/guest/power_button.py) on stand-in devices: a
FIFO carries the input_event records a real /dev/input/event<N> would."""

from __future__ import annotations

import os
import threading

from ukgpu.kernel.guest import power_button as pb


def event(kind: int, code: int, value: int) -> bytes:
    return pb.EVENT.pack(1, 2, kind, code, value)


def fake_device(tmp_path, name: str, key_words: str):
    caps = tmp_path / "sys" / name / "device" / "capabilities"
    caps.mkdir(parents=True)
    (caps / "key").write_text(key_words + "\n")
    dev = tmp_path / "dev" / name
    dev.parent.mkdir(exist_ok=True)
    os.mkfifo(dev)
    return dev


def test_only_a_power_key_press_counts():
    assert pb.is_power_press(event(pb.EV_KEY, pb.KEY_POWER, 1))
    assert not pb.is_power_press(event(pb.EV_KEY, pb.KEY_POWER, 0))  # release
    assert not pb.is_power_press(event(pb.EV_KEY, 30, 1))  # another key
    assert not pb.is_power_press(event(0, 0, 0))  # a SYN record


def test_a_press_on_the_power_device_calls_back_once(tmp_path):
    power = fake_device(tmp_path, "event0", "10000000000000 0")  # bit 116: KEY_POWER
    fake_device(tmp_path, "event1", "0")  # a device without a power key is not opened
    pressed = threading.Event()
    calls = []
    thread = pb.watch(lambda: (calls.append(1), pressed.set()), str(tmp_path / "dev" / "event*"),
                      str(tmp_path / "sys"))
    assert thread is not None
    with open(power, "wb", buffering=0) as dev:
        dev.write(event(pb.EV_KEY, 30, 1) + event(0, 0, 0))
        dev.write(event(pb.EV_KEY, pb.KEY_POWER, 1) + event(pb.EV_KEY, pb.KEY_POWER, 1))
        assert pressed.wait(5)
    thread.join(5)
    assert calls == [1] and not thread.is_alive()


def test_no_power_device_means_no_watcher(tmp_path):
    fake_device(tmp_path, "event0", "0")
    assert pb.watch(lambda: None, str(tmp_path / "dev" / "event*"), str(tmp_path / "sys")) is None
