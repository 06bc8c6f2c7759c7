"""The API's key and browser checks (kernel/api/security.py) on the fake engine: the key on every
route but /health, foreign Host and Origin refused, JSON bodies only, CORS for allowed origins,
no poweroff route, and the key options of `ukgpu serve`."""

from __future__ import annotations

import argparse

import httpx
import openai
import pytest
from starlette.testclient import TestClient
from test_api_fakes import FakeEngine

from ukgpu.kernel.api import create_app, security
from ukgpu.kernel.api.server import background
from ukgpu.tools.commands import serve as serve_cmd

MODEL = "fake"
KEY = "sk-test-0123456789"
LOCAL = "http://127.0.0.1:8080"
COMPLETION = {"model": MODEL, "prompt": "abc", "max_tokens": 2, "temperature": 0}
# every route the app serves, with a request that succeeds given the key
ROUTES = [("POST", "/v1/completions", COMPLETION),
          ("POST", "/v1/chat/completions",
           {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
          ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
          ("POST", "/tokenize", {"content": "ab"}), ("POST", "/detokenize", {"tokens": [97]})]


def _client(policy: security.Policy | None = None, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(FakeEngine(), model_id=MODEL, policy=policy), base_url=base_url)


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_but_health_needs_the_key(method, path, body):
    with _client(security.Policy(api_key=KEY)) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            resp = c.request(method, path, json=body, headers=headers)
            _error(resp, 401, "invalid_api_key")
            assert resp.headers["www-authenticate"] == "Bearer"
        ok = c.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
        assert c.get("/health").status_code == 200


def test_no_key_configured_needs_none():
    with _client() as c:
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200


def test_poweroff_is_not_an_api_route():
    with _client(security.Policy(api_key=KEY)) as c:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/admin/poweroff", json={}, headers=auth).status_code == 404
        _error(c.post("/admin/poweroff", json={}), 401, "invalid_api_key")


def test_cross_site_text_plain_post_is_refused():
    """What any web page can send without a CORS preflight."""
    with _client() as c:
        page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        for path in ("/v1/completions", "/admin/poweroff"):
            resp = c.post(path, content=b'{"model": "fake", "prompt": "x"}', headers=page)
            _error(resp, 403, "origin_not_allowed")
        same_site_plain = c.post("/v1/completions", content=b"{}",
                                 headers={"Content-Type": "text/plain", "Origin": LOCAL})
        _error(same_site_plain, 415, "unsupported_media_type")
        _error(c.post("/tokenize", content=b'{"content": "a"}'), 415, "unsupported_media_type")
        ok = c.post("/v1/completions", json=COMPLETION, headers={"Origin": LOCAL})
        assert ok.status_code == 200 and "access-control-allow-origin" not in ok.headers
        charset = c.post("/tokenize", content=b'{"content": "a"}',
                         headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert charset.status_code == 200, charset.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "10.1.2.3:80", "[::2]:80",
                                  "localhost.evil.example"])
def test_foreign_host_is_refused(host):
    with _client() as c:
        for method, path in (("GET", "/v1/models"), ("GET", "/health")):
            resp = c.request(method, path, headers={"Host": host})
            _error(resp, 403, "host_not_allowed")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1", "127.0.0.1:8080", "[::1]:9", "[::1]"])
def test_local_hosts_are_accepted(host):
    with _client() as c:
        assert c.get("/v1/models", headers={"Host": host}).status_code == 200


def test_bound_address_and_allowed_names_are_accepted():
    policy = security.policy_for("192.168.1.5", None, ["llm.lan"], ["https://app.example/"])
    with _client(policy) as c:
        for host in ("192.168.1.5:8080", "llm.lan", "LLM.lan:80"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200
        _error(c.get("/v1/models", headers={"Host": "other.lan"}), 403, "host_not_allowed")
    assert "0.0.0.0" not in security.policy_for("0.0.0.0").hosts()


def test_allowed_origin_gets_cors_and_its_preflight_answered():
    origin = "https://app.example"
    policy = security.policy_for("127.0.0.1", KEY, [], [origin])
    with _client(policy) as c:
        pre = c.options("/v1/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == origin
        assert "authorization" in pre.headers["access-control-allow-headers"]
        ok = c.post("/v1/completions", json=COMPLETION,
                    headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
        denied = c.post("/v1/completions", json=COMPLETION, headers={"Origin": origin})
        _error(denied, 401, "invalid_api_key")
        assert denied.headers["access-control-allow-origin"] == origin  # the page can read why
        other = c.options("/v1/completions", headers={"Origin": "https://app.example.evil"})
        _error(other, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in other.headers


def test_refusals_are_counted_in_metrics():
    with _client(security.Policy(api_key=KEY)) as c:
        c.get("/v1/models")
        text = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'ukgpu_requests_total{path="/v1/models",status="401"} 1' in text


def test_openai_client_with_and_without_the_key():
    app = create_app(FakeEngine(), model_id=MODEL, policy=security.Policy(api_key=KEY))
    with background(app) as base:
        good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=30)
        bad = openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0, timeout=30)
        assert [m.id for m in good.models.list()] == [MODEL]
        got = good.completions.create(model=MODEL, prompt="abc", max_tokens=2, temperature=0)
        assert got.choices[0].text and got.usage.completion_tokens == 2
        chat = good.chat.completions.create(model=MODEL, max_tokens=2,
                                            messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content
        calls = [bad.models.list,
                 lambda: bad.completions.create(model=MODEL, prompt="abc", max_tokens=2),
                 lambda: bad.chat.completions.create(model=MODEL, max_tokens=2,
                                                     messages=[{"role": "user", "content": "hi"}])]
        for call in calls:
            with pytest.raises(openai.AuthenticationError) as info:
                call()
            assert info.value.code == "invalid_api_key"
        assert httpx.get(base + "/health").status_code == 200


def _args(**kw) -> argparse.Namespace:
    base = {"api_key": None, "api_key_file": None, "host": "127.0.0.1", "allowed_host": [],
            "allowed_origin": []}
    return argparse.Namespace(**{**base, **kw})


def test_serve_key_options(tmp_path):
    assert serve_cmd.security_policy(_args(), env={}).api_key is None
    assert serve_cmd.security_policy(_args(), env={"UKGPU_API_KEY": "e"}).api_key == "e"
    assert serve_cmd.security_policy(_args(api_key="f"), env={"UKGPU_API_KEY": "e"}).api_key == "f"
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file\n")
    assert serve_cmd.security_policy(_args(api_key_file=str(keyfile)), env={}).api_key == "from-file"
    (tmp_path / "empty").write_text("\n")
    for bad, why in ((_args(api_key_file=str(tmp_path / "empty")), "is empty"),
                     (_args(api_key_file=str(tmp_path / "missing")), "cannot read"),
                     (_args(api_key="a", api_key_file=str(keyfile)), "not both"),
                     (_args(api_key=" "), "empty")):
        with pytest.raises(SystemExit, match=why):
            serve_cmd.security_policy(bad, env={})


def test_serve_accepts_the_flags():
    parser = argparse.ArgumentParser()
    serve_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "-m", "x", "--api-key", "k", "--allowed-host", "a.lan",
                              "--allowed-host", "b.lan", "--allowed-origin", "http://a.lan:3000"])
    policy = serve_cmd.security_policy(args, env={})
    assert policy.api_key == "k" and {"a.lan", "b.lan", "127.0.0.1"} <= policy.hosts()
    assert policy.allowed_origins == ("http://a.lan:3000",)


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/completions", "logit_bias", {"50256": -100}), ("/v1/completions", "echo", True),
    ("/v1/completions", "best_of", 3), ("/v1/completions", "suffix", "tail"),
    ("/v1/chat/completions", "logit_bias", {"1": 5}), ("/v1/chat/completions", "functions",
                                                       [{"name": "f", "parameters": {}}]),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "reasoning_effort", "high"), ("/v1/chat/completions", "store", True),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
])
def test_unimplemented_fields_are_400_naming_them(path, field, value):
    body = dict(ROUTES[0][2] if path == "/v1/completions" else ROUTES[1][2])
    with _client() as c:
        err = _error(c.post(path, json={**body, field: value}), 400, "invalid_value")
        assert err["param"] == field and f"does not implement '{field}'" in err["message"]
        doc = c.get("/openapi.json").json()["paths"][path]["post"]["requestBody"]
        assert field in doc["content"]["application/json"]["schema"]["properties"]


@pytest.mark.parametrize(("path", "off"), [
    ("/v1/completions", {"echo": False, "best_of": 1, "logit_bias": {}, "suffix": None}),
    ("/v1/chat/completions", {"logit_bias": {}, "store": False, "modalities": ["text"],
                              "functions": None, "user": "u", "metadata": {"k": "v"}}),
])
def test_the_off_values_clients_send_by_default_are_accepted(path, off):
    body = dict(ROUTES[0][2] if path == "/v1/completions" else ROUTES[1][2])
    with _client() as c:
        resp = c.post(path, json={**body, **off})
        assert resp.status_code == 200, resp.text


def test_openai_client_gets_bad_request_for_echo():
    with background(create_app(FakeEngine(), model_id=MODEL)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="abc", max_tokens=2, echo=True)
        assert info.value.param == "echo"


def test_boot_passes_the_key_file_to_the_guest_command_line(tmp_path, monkeypatch):
    import shutil

    from ukgpu.kernel.image import qemu
    from ukgpu.kernel.image.build import Image
    from ukgpu.tools.commands import boot as boot_cmd

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.delenv(security.KEY_ENV, raising=False)
    image = Image(tmp_path, {"kernel": "vmlinux", "initramfs": "initramfs.cpio",
                             "cmdline": "console=ttyS0 ukgpu.manifest=ab",
                             "sizes": {"initramfs": 1 << 20}, "model": {"size": 1 << 20, "disk": False}})
    parser = argparse.ArgumentParser()
    boot_cmd.register(parser.add_subparsers())
    (tmp_path / "key").write_text("k-123\n")
    args = parser.parse_args(["boot", str(tmp_path), "--api-key-file", str(tmp_path / "key")])
    cmd = qemu.qemu_command(image, boot_cmd.vm_options(args), port=1)
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 ukgpu.manifest=ab ukgpu.api_key=k-123"
    no_key = qemu.qemu_command(image, boot_cmd.vm_options(parser.parse_args(["boot", "d"])), port=1)
    assert "api_key" not in " ".join(no_key)
    with pytest.raises(qemu.BootError, match="without spaces"):
        qemu.qemu_command(image, qemu.BootOptions(api_key="a b"), port=1)
    restore = qemu.qemu_command(image, boot_cmd.vm_options(args), port=1, key_on_cmdline=False)
    assert "k-123" not in " ".join(restore)  # a restore sends it over the console


def test_serve_warns_when_it_listens_beyond_loopback_without_a_key(capsys):
    serve_cmd.security_policy(_args(host="0.0.0.0"), env={})
    assert "without an API key" in capsys.readouterr().err
    for quiet in (_args(host="0.0.0.0", api_key="k"), _args(host="127.0.0.1"), _args(host="::1"),
                  _args(host="localhost")):
        serve_cmd.security_policy(quiet, env={})
        assert capsys.readouterr().err == ""
