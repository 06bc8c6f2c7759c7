"""Snapshots of the real image under QEMU (TCG): take one from a verified cold boot, restore it
(READY without booting), and check that each restored copy gets the host's clock and its own API
key over the console, answers like the host engine, and that a changed state file never runs.
Failing tests carry the guest's serial console."""

from __future__ import annotations

import time

import httpx
import pytest

from ukgpu.kernel.image import qemu, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BODY = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def saved(built_image):
    """The session image's snapshot for the default options (removed afterwards: ~600 MiB)."""
    opts = qemu.BootOptions(port=0)
    taken = snapshot.take(built_image, opts, log=lambda msg: None, timeout=600)
    yield taken
    snapshot.drop(built_image, opts)


def _restore(image, saved, attach_vm, **opts) -> qemu.Vm:
    """A Vm restoring `saved` (not started: `with` starts it)."""
    return attach_vm(qemu.Vm(image, qemu.BootOptions(port=0, **opts), restore=saved))


def test_find_sees_the_snapshot_for_the_same_options_only(built_image, saved):
    assert snapshot.find(built_image, qemu.BootOptions(port=0)) == saved
    assert snapshot.find(built_image, qemu.BootOptions(port=0, mem="3G")) is None


def test_a_restore_answers_like_the_host_engine_with_the_hosts_clock(built_image, saved, attach_vm,
                                                                      smollm2_path):
    with _restore(built_image, saved, attach_vm) as vm:
        ready = vm.wait_ready(120)
        assert ready["restored"] == 1 and ready["port"] == qemu.GUEST_PORT
        assert httpx.get(vm.url + "/health", timeout=30).json()["image_verified"] is True
        counted = httpx.get(vm.url + "/metrics", timeout=30).text
        assert 'path="/v1/completions"' not in counted, "the snapshot's warm-up counted as a request"
        before = time.time()
        resp = httpx.post(vm.url + "/v1/completions", json=BODY, timeout=300)
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert abs(got["created"] - before) < 60, "the restored guest kept the snapshot's clock"
        assert vm.poweroff(60) == 0
    from ukgpu.llama_core.engine import Engine
    from ukgpu.llama_core.sampling import SamplingParams

    engine = Engine.load(smollm2_path, backend="cpu", n_ctx=256, n_slots=1)
    ids = engine.tokenizer.encode(BODY["prompt"])
    host = "".join(e.text for e in engine.generate(ids, SamplingParams(temperature=0.0), max_tokens=3))
    assert got["choices"][0]["text"] == host


def test_each_restore_brings_its_own_key_and_never_shows_it(built_image, saved, attach_vm):
    key = "sk-restore-7f3a9c"
    with _restore(built_image, saved, attach_vm, api_key=key) as vm:
        vm.wait_ready(120)
        assert not any(key in word for word in vm.command), "the key must not be in QEMU's arguments"
        assert httpx.get(vm.url + "/v1/models", timeout=30).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(vm.url + "/v1/models", headers=auth, timeout=30).status_code == 200
        assert vm.poweroff(60) == 0
    assert not any(key in line for line in vm.log), "the console echoed the key"


def test_a_changed_state_file_never_runs(built_image, saved, attach_vm, tmp_path):
    copy = tmp_path / "changed.state"
    data = bytearray(saved.state.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(data)
    vm = _restore(built_image, qemu.Restore(copy, saved.chunk, saved.chunks, saved.image), attach_vm)
    vm.start()
    with pytest.raises(qemu.BootError, match="does not match the host's record"):
        vm.wait_ready(120)
    vm.kill()
    assert vm.ready is None
    assert not any(line.startswith("ukgpu:") for line in vm.log), "the guest must not have run"
