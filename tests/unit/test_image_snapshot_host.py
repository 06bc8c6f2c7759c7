"""Snapshots on the host side (kernel/image/snapshot.py, qemu.Vm's restore): what a saved state is
keyed by, the host's record of it, and the check of every piece before QEMU may read it."""

from __future__ import annotations

import os
import threading

import pytest
from test_image_trust import cache, make_image  # noqa: F401  (the fixture)

from ukgpu.kernel.image import qemu, snapshot, trust

OPTS = qemu.BootOptions(port=0, qemu="true")  # `true --version` answers: no QEMU needed here


def test_settings_key_the_machine_and_never_the_api_key(cache):  # noqa: F811
    image = make_image(cache / "img")
    base = snapshot.settings(image, OPTS)
    assert base["image"] == trust.digest_of(trust.record_of(image.info)) and base["mem"] == "2048M"
    keyed = snapshot.key_of(base)
    assert snapshot.key_of(snapshot.settings(image, qemu.BootOptions(port=9, qemu="true", api_key="k"))) == keyed
    for change in ({"mem": "4G"}, {"cpus": 4}, {"append": ["ukgpu.ctx=4096"]}, {"arena": "1G"},
                   {"accel": "kvm"}):
        other = qemu.BootOptions(port=0, qemu="true", **change)
        assert snapshot.key_of(snapshot.settings(image, other)) != keyed, change
    assert snapshot.settings(image, qemu.BootOptions(qemu="true", gpu="0000:01:00.0")) is None
    assert snapshot.settings(image, qemu.BootOptions(qemu="true", verify=False)) is None


def test_the_snapshot_command_keys_the_machine_a_boot_with_the_same_options_finds(cache, tmp_path):  # noqa: F811
    """`ukgpu image snapshot DIR --cpus 4 ...` and `ukgpu boot DIR --cpus 4 ... --port --api-key-file`
    name the same saved state: port, key and the boot-only options do not enter its key."""
    import argparse
    from dataclasses import replace

    from ukgpu.tools.commands import boot as boot_cmd
    from ukgpu.tools.commands import image as image_cmd

    parser = argparse.ArgumentParser()
    verbs = parser.add_subparsers()
    boot_cmd.register(verbs)
    image_cmd.register(verbs)
    (tmp_path / "key").write_text("k-1\n")
    machine = ["--cpus", "4", "--arena", "1G", "--append", "ukgpu.ctx=4096"]
    taken = boot_cmd.machine_options(parser.parse_args(["image", "snapshot", "d", *machine]))
    booted = boot_cmd.vm_options(parser.parse_args(["boot", "d", *machine, "--port", "9000",
                                                    "--api-key-file", str(tmp_path / "key")]))
    assert (taken.port, taken.api_key, booted.port, booted.api_key) == (0, None, 9000, "k-1")
    image = make_image(cache / "img")

    def key(opts):
        return snapshot.key_of(snapshot.settings(image, replace(opts, qemu="true")))  # `true --version`

    assert key(taken) == key(booted)
    assert key(taken) != key(boot_cmd.vm_options(parser.parse_args(["boot", "d", "--port", "9000"])))


def _record(image, opts, data: bytes):
    found = snapshot.settings(image, opts)
    key = snapshot.key_of(found)
    snapshot.states_dir().mkdir(parents=True)
    state = snapshot.states_dir() / f"{key}.state"
    state.write_bytes(data)
    trust.write_record(snapshot.records_dir(), key, {
        "settings": found, "chunk": snapshot.CHUNK, "chunks": snapshot.chunk_digests(state), "size": len(data),
        "taken": 1})
    return state


def test_find_returns_the_recorded_state_for_the_same_options_only(cache):  # noqa: F811
    image = make_image(cache / "img")
    assert snapshot.find(image, OPTS) is None
    state = _record(image, OPTS, b"x" * (snapshot.CHUNK + 5))
    found = snapshot.find(image, OPTS)
    assert found is not None and found.state == state and len(found.chunks) == 2
    assert found.image == trust.digest_of(trust.record_of(image.info))
    assert snapshot.records_dir().parent == trust.trust_dir()  # the record sits beside the image records
    assert snapshot.find(image, qemu.BootOptions(port=0, qemu="true", mem="4G")) is None
    assert snapshot.drop(image, OPTS) and snapshot.find(image, OPTS) is None and not state.exists()
    assert not snapshot.drop(image, OPTS)


def test_take_refuses_a_key_or_a_gpu_before_booting(cache):  # noqa: F811
    image = make_image(cache / "img")
    with pytest.raises(snapshot.SnapshotError, match="never holds an API key"):
        snapshot.take(image, qemu.BootOptions(qemu="true", api_key="k"))
    with pytest.raises(snapshot.SnapshotError, match="GPU"):
        snapshot.take(image, qemu.BootOptions(qemu="true", gpu="0000:01:00.0"))


def _pump(restore: qemu.Restore) -> tuple[str | None, bytes]:
    read, write = os.pipe()
    got = bytearray()

    def drain() -> None:
        with open(read, "rb") as f:
            while chunk := f.read(1 << 16):
                got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    result = qemu._pump_verified(restore, write)
    reader.join(10)
    return result, bytes(got)


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 4096 + 7])
def test_the_pump_passes_a_matching_state_through_unchanged(tmp_path, size):
    state = tmp_path / "s.state"
    data = os.urandom(size)
    state.write_bytes(data)
    restore = qemu.Restore(state, 4096, tuple(snapshot.chunk_digests(state, 4096)), "d")
    assert len(restore.chunks) == -(-size // 4096)  # whole pieces, the last one shorter
    assert _pump(restore) == (None, data)


def test_the_pump_stops_before_a_changed_piece_reaches_qemu(tmp_path):
    state = tmp_path / "s.state"
    data = bytearray(os.urandom(3 * 4096 + 7))
    state.write_bytes(data)
    chunks = tuple(snapshot.chunk_digests(state, 4096))
    data[4096 + 100] ^= 1
    state.write_bytes(data)
    result, passed = _pump(qemu.Restore(state, 4096, chunks, "d"))
    assert result == "piece 1 of 4 differs" and passed == bytes(data[:4096])
    state.write_bytes(bytes(data[:4096]))  # cut short
    assert _pump(qemu.Restore(state, 4096, chunks, "d"))[0] == "piece 1 of 4 differs"
    whole = os.urandom(2 * 4096)
    state.write_bytes(whole)
    chunks = tuple(snapshot.chunk_digests(state, 4096))
    state.write_bytes(whole + b"more")
    assert _pump(qemu.Restore(state, 4096, chunks, "d")) == ("it is longer than recorded", whole)


def test_a_snapshot_of_another_image_is_refused_before_qemu_starts(cache):  # noqa: F811
    image = make_image(cache / "img")
    trust.pin(image.info)
    other = qemu.Restore(cache / "nowhere.state", snapshot.CHUNK, (), "0" * 64)
    with pytest.raises(qemu.BootError, match="another image"):
        qemu.Vm(image, OPTS, restore=other)
