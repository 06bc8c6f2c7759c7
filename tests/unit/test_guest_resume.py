"""The guest's side of snapshots (kernel/guest/resume.py): the host's `resume` line, the console
without echo, the sealed API, and the console commands that drive them."""

from __future__ import annotations

import io
import json
import os
import sys
import termios

import pytest
from starlette.testclient import TestClient
from test_api_fakes import FakeEngine

from ukgpu.kernel.api import create_app, security
from ukgpu.kernel.guest import resume
from ukgpu.kernel.guest.init import BootConfig, Guest, serial_commands

ENTROPY = "ab" * 32


def _line(**over) -> str:
    doc = {"time_ns": 1_800_000_000_000_000_000, "entropy": ENTROPY, "api_key": "sk-1"} | over
    return json.dumps(doc)


def test_parse_resume_takes_the_hosts_clock_entropy_and_key():
    got = resume.parse_resume(_line())
    assert got == resume.Resume(1_800_000_000_000_000_000, bytes.fromhex(ENTROPY), "sk-1")
    assert resume.parse_resume(_line(api_key=None)).api_key is None


@pytest.mark.parametrize(("payload", "says"), [
    ("not json", "one JSON object"),
    (json.dumps({"time_ns": 1, "entropy": ENTROPY}), "exactly the keys"),
    (_line(time_ns=0), "wall clock"),
    (_line(time_ns=True), "wall clock"),
    (_line(entropy="zz" * 32), "hex digits"),
    (_line(entropy="ab" * 8), "at least 32 bytes"),
    (_line(api_key=""), "printable"),
    (_line(api_key="a\nb"), "printable"),
])
def test_parse_resume_refuses_what_is_not_the_hosts_line(payload, says):
    with pytest.raises(ValueError, match=says):
        resume.parse_resume(payload)


def test_quiet_console_turns_echo_off_on_a_terminal_and_ignores_a_pipe():
    leader, follower = os.openpty()
    try:
        with open(follower, "rb", closefd=False) as stream:
            assert termios.tcgetattr(follower)[3] & termios.ECHO
            resume.quiet_console(stream)
            assert not termios.tcgetattr(follower)[3] & termios.ECHO
    finally:
        os.close(leader)
        os.close(follower)
    resume.quiet_console(io.StringIO("not a terminal"))  # no file descriptor: nothing happens


def test_a_sealed_gate_answers_503_everywhere_until_unsealed_with_its_new_key():
    gate = security.Gate(security.Policy())
    app = create_app(FakeEngine(), model_id="fake", policy=gate)
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        assert client.get("/v1/models").status_code == 200
        assert resume.seal(gate, lambda: app.in_flight, timeout=1)
        for path in ("/health", "/v1/models"):
            resp = client.get(path)
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "restoring"
        gate.set(security.Policy(api_key="sk-new"))
        gate.unseal()
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-new"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_seal_waits_for_requests_in_flight_and_gives_up_after_the_timeout():
    gate = security.Gate()
    assert not resume.seal(gate, lambda: 1, timeout=0.05)
    assert gate.sealed


class _Api:
    in_flight = 0

    def __init__(self) -> None:
        from ukgpu.kernel.api.metrics import Metrics

        self.metrics = Metrics()
        self.metrics.count_request("/v1/completions", 200)  # the snapshot's warm-up


def _guest(cmdline: str = "") -> Guest:
    guest = Guest(t_init=1.0)
    guest.cfg = BootConfig.parse(cmdline)
    guest.gate = security.Gate(security.Policy())
    guest.app = _Api()
    guest.backend_note = "cpu (test)"
    return guest


def test_console_snapshot_then_resume_sets_clock_entropy_and_key(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(resume, "set_clock", lambda ns: calls.append(("clock", ns)))
    monkeypatch.setattr(resume, "reseed", lambda seed: calls.append(("entropy", seed)))
    guest = _guest("ukgpu.allowed_hosts=gw.example")
    guest.resume(_line())  # never sealed: a cold-booted guest ignores it
    assert calls == [] and "resume ignored" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"snapshot\nresume {_line(entropy='cd' * 40)}\n"))
    monkeypatch.setattr("time.sleep", lambda s: (_ for _ in ()).throw(SystemExit))  # end the loop
    with pytest.raises(SystemExit):
        serial_commands(guest)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == resume.SNAPSHOT_READY
    assert out[1].startswith("READY restored=1 resume=") and out[1].endswith("backend=cpu (test)")
    assert calls == [("clock", 1_800_000_000_000_000_000), ("entropy", bytes.fromhex("cd" * 40))]
    assert guest.gate.sealed is None and not guest.app.metrics.requests
    assert guest.gate.policy.api_key == "sk-1"
    assert guest.gate.policy.allowed_hosts == ("gw.example",)


def test_a_bad_resume_line_keeps_the_guest_sealed(monkeypatch, capsys):
    monkeypatch.setattr(resume, "set_clock", lambda ns: pytest.fail("clock set from a bad line"))
    guest = _guest()
    guest.snapshot()
    guest.resume('{"time_ns": 5}')
    assert "resume refused" in capsys.readouterr().out
    assert guest.gate.sealed


def test_a_guest_with_a_key_on_its_command_line_refuses_to_be_snapshotted(capsys):
    guest = _guest("ukgpu.api_key=sk-cmdline")
    guest.snapshot()
    out = capsys.readouterr().out
    assert "snapshot refused" in out and resume.SNAPSHOT_READY not in out
    assert guest.gate.sealed is None
