"""The guest init steps that run on the host: command line, arena sizing, manifest digest, console,
the supervisor's reasons."""

import hashlib
import io
import sys

import pytest

from ukgpu.kernel import manifest
from ukgpu.kernel.guest.init import DEFAULT_NET, BootConfig, arena_size, parse_ip, serial_commands
from ukgpu.kernel.guest.syscalls import InitError, NetConfig
from ukgpu.kernel.manifest import ManifestError


def test_cmdline_defaults_and_keys():
    cfg = BootConfig.parse("console=ttyS0 panic=-1 quiet ukgpu.manifest=ABC123 ukgpu.arena=2G "
                           "ukgpu.port=9000 ukgpu.ctx=512 ukgpu.slots=3 ukgpu.backend=cpu "
                           "ukgpu.model=/dev/vda ukgpu.future=1 ukgpu.cpu_activations=q8")
    assert cfg.manifest_sha256 == "abc123"
    assert cfg.arena == "2G" and cfg.port == 9000 and cfg.ctx == 512 and cfg.slots == 3
    assert cfg.backend == "cpu" and cfg.model == "/dev/vda" and cfg.verify == "full"
    assert cfg.cpu_activations == "q8" and BootConfig().cpu_activations == "f32"
    assert cfg.net == DEFAULT_NET
    assert cfg.extra == {"future": "1"}
    assert BootConfig.parse("console=ttyS0").manifest_sha256 is None


@pytest.mark.parametrize("word", ["ukgpu.port=0", "ukgpu.ctx=lots", "ukgpu.backend=tpu",
                                  "ukgpu.verify=maybe", "ip=dhcp", "ip=10.0.2.300",
                                  "ukgpu.cpu_activations=int4"])
def test_cmdline_rejects_bad_values_naming_the_word(word):
    with pytest.raises(InitError, match=word.replace(".", r"\.")):
        BootConfig.parse(f"console=ttyS0 {word}")


def test_ip_kernel_syntax():
    assert parse_ip("192.168.7.2::192.168.7.1:255.255.0.0::eth1:off") == \
        NetConfig("192.168.7.2/16", "192.168.7.1", "eth1")
    assert parse_ip("10.1.2.3") == NetConfig("10.1.2.3/24", None, "eth0")
    assert parse_ip("off") is None
    assert BootConfig.parse("ip=none").net is None


def test_arena_size_explicit_or_from_kv_cache():
    cfg = BootConfig(ctx=2048, slots=2)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 -> K+V float32 for 2 slots of 2048
    kv = 2 * 30 * 2048 * 3 * 64 * 4 * 2
    assert arena_size(cfg, 30, 3, 64) == kv + kv // 4 + (64 << 20)
    cfg.slots = 4
    assert arena_size(cfg, 30, 3, 64) > kv * 2
    assert arena_size(BootConfig(arena="1.5G"), 30, 3, 64) == 3 << 29


def _image_tree(tmp_path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"\x7fELF tool")
    (root / "models").mkdir()
    (root / "models/m.gguf").write_bytes(b"GGUF" + bytes(4096))
    (root / "bin").symlink_to("usr/bin")
    files = {f"/{p.relative_to(root).as_posix()}": manifest.digests(p)
             for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    doc = {"format": manifest.FORMAT, "files": files, "links": {"/bin": "usr/bin"}}
    raw = manifest.dumps(doc)
    (root / "etc/ukgpu").mkdir(parents=True)
    (root / "etc/ukgpu/manifest.json").write_bytes(raw)
    return root, doc, hashlib.sha256(raw).hexdigest()


def test_manifest_load_checks_the_digest_from_the_command_line(tmp_path):
    root, doc, digest = _image_tree(tmp_path)
    path = root / "etc/ukgpu/manifest.json"
    assert manifest.load(path, digest) == doc
    with pytest.raises(ManifestError, match="differs from ukgpu.manifest"):
        manifest.load(path, "0" * 64)
    with pytest.raises(ManifestError, match="ukgpu.manifest="):
        manifest.load(path, None)
    doc["format"] = "other/9"
    path.write_bytes(manifest.dumps(doc))
    with pytest.raises(ManifestError, match="format"):
        manifest.load(path, hashlib.sha256(path.read_bytes()).hexdigest())


class _PoweredOff(Exception):
    """Stands for the power-off that never returns."""


class _Guest:
    def __init__(self):
        self.reasons = []

    def shutdown(self, reason):
        self.reasons.append(reason)
        raise _PoweredOff


def test_poweroff_is_a_console_command_and_the_key_a_boot_parameter(monkeypatch, capsys):
    guest = _Guest()
    monkeypatch.setattr(sys, "stdin", io.StringIO("halt\n\npoweroff\n"))
    with pytest.raises(_PoweredOff):
        serial_commands(guest)
    assert guest.reasons == ["poweroff on the serial console"]
    assert "unknown console command 'halt'" in capsys.readouterr().out
    assert BootConfig.parse("ukgpu.manifest=ab ukgpu.api_key=s3cret").extra == {"api_key": "s3cret"}


def test_allowed_hosts_on_the_command_line_extend_the_local_names():
    from ukgpu.kernel.api import security
    from ukgpu.kernel.guest.init import api_policy

    plain = api_policy(BootConfig.parse("ukgpu.api_key=k"))
    assert plain.api_key == "k" and not plain.allowed_hosts
    cfg = BootConfig.parse("ukgpu.allowed_hosts=ukgpu.default.svc,gw.example")
    assert api_policy(cfg).allowed_hosts == ("ukgpu.default.svc", "gw.example")
    assert isinstance(api_policy(cfg), security.Policy)


def test_stage1_times_split_the_boot_before_this_init():
    from ukgpu.kernel.guest.init import stage1_times

    env = {"UKGPU_STAGE1_START": "0.800", "UKGPU_STAGE1_SECONDS": "0.450"}
    times = stage1_times(env, 1.5)
    assert times == pytest.approx({"boot_to_init": 0.8, "root": 0.45, "python_start": 0.25})
    assert stage1_times({}, 2.0) == {"boot_to_init": 2.0}


def test_the_supervisor_names_a_verity_failure_and_stays_quiet_after_the_guests_own_fatal():
    import os
    import signal

    from ukgpu.kernel.guest.init import death_reason

    line = "device-mapper: verity: 254:1: data block 17 is corrupted"
    killed = death_reason(signal.SIGBUS, [line])  # a raw wait status: killed by SIGBUS
    assert "SIGBUS" in killed and "dm-verity" in killed and "data block 17" in killed
    assert "refusing to serve" in killed
    assert "SIGKILL" in death_reason(signal.SIGKILL, [])
    exited = 1 << 8  # exit status 1, after the guest printed its own FATAL line
    assert os.WIFEXITED(exited) and death_reason(exited, []) is None
    assert "failed block check" in death_reason(exited, [line])


def test_disk_reads_come_from_the_device_mapper_stats(tmp_path):
    from ukgpu.kernel.guest.init import disk_reads

    for name, label, sectors in (("dm-0", "ukgpu-root", 2048), ("dm-1", "ukgpu-model", 10)):
        (tmp_path / name / "dm").mkdir(parents=True)
        (tmp_path / name / "dm" / "name").write_text(label + "\n")
        (tmp_path / name / "stat").write_text(f"  120 0 {sectors} 33 0 0 0 0 0 40 33 0 0 0 0\n")
    (tmp_path / "vda").mkdir()
    assert disk_reads(str(tmp_path)) == {"ukgpu-root": 2048 * 512, "ukgpu-model": 10 * 512}
    assert disk_reads(str(tmp_path / "none")) == {}


def test_prefetch_reads_the_file_once_and_a_missing_one_quietly(tmp_path):
    from ukgpu.kernel.guest.init import prefetch

    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(range(256)) * 9000)
    thread = prefetch(str(path), chunk=4096)
    thread.join(10)
    assert not thread.is_alive()
    missing = prefetch(str(tmp_path / "none"))
    missing.join(10)
    assert not missing.is_alive()  # the loader reports the error, not this thread
