"""Who may use the API: an optional API key and the checks that keep browsers out.

`guard(app, policy)` wraps the ASGI app; every HTTP request passes, in order:
 1. Host: the `Host` header's name (port ignored) must be local (localhost,
    127.0.0.1, [::1]), the address the server binds, or one of
    `policy.allowed_hosts`; else 403 `host_not_allowed`.  A page on a foreign
    name that DNS rebinding points at this server carries that foreign name.
 2. Origin: when present it must be this server itself (scheme://Host) or one
    of `policy.allowed_origins`; else 403 `origin_not_allowed`.  Browsers send
    Origin on every cross-site POST, also on the "simple" ones (text/plain)
    that need no CORS preflight.  An allowed foreign origin gets CORS headers
    and its preflight (OPTIONS) is answered here.
 3. API key: with `policy.api_key` set, every path but /health needs
    `Authorization: Bearer <key>` (compared in constant time); else 401
    `invalid_api_key` with `WWW-Authenticate: Bearer`.  The official openai
    client sends its `api_key` this way.
 4. Content-Type: a POST must declare `application/json`; else 415
    `unsupported_media_type`.  A browser can send text/plain cross-site
    without asking; it cannot send application/json without a preflight.
Refusals are OpenAI-shaped (`errors.error_body`).  The key comes from
`--api-key`, `--api-key-file` or `UKGPU_API_KEY` (`resolve_key`).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ukgpu.kernel.api.errors import ApiError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = frozenset({"/health"})  # liveness probes carry no key
KEY_ENV = "UKGPU_API_KEY"


@dataclass(frozen=True)
class Policy:
    """`allowed_hosts`: host names or addresses without port; `allowed_origins`:
    `scheme://host[:port]` exactly as browsers send them."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def hosts(self) -> frozenset[str]:
        return frozenset(h.lower().strip("[]") for h in (*LOCAL_HOSTS, *self.allowed_hosts))


def policy_for(bind_host: str, api_key: str | None = None, allowed_hosts=(),
               allowed_origins=()) -> Policy:
    """The policy of a server listening on `bind_host`: that address is a name clients may use
    (a wildcard such as 0.0.0.0 is not; name the machine's addresses with allowed_hosts)."""
    hosts = tuple(allowed_hosts)
    if not _is_wildcard(bind_host):
        hosts = (*hosts, bind_host)
    return Policy(api_key or None, hosts, tuple(o.rstrip("/").lower() for o in allowed_origins))


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


def resolve_key(flag: str | None, path: str | None, env: Mapping[str, str]) -> str | None:
    """The API key: `--api-key`, else the first line of `--api-key-file`, else $UKGPU_API_KEY."""
    if flag is not None and path is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the API key file {path}: {exc.strerror}") from None
        if not key:
            raise ValueError(f"the API key file {path} is empty; write the key on its first line")
        return key
    given = flag if flag is not None else env.get(KEY_ENV)
    if given is not None and not given.strip():
        raise ValueError("the API key is empty; give a non-empty key or none")
    return given.strip() if given is not None else None


class Gate:
    """The policy a running server enforces, replaceable while it serves, and whether it is sealed.

    The guest seals its gate before it is snapshotted and unseals it once a restored copy has
    its own key, clock and entropy (kernel/guest/resume.py): in between every request, /health
    included, gets 503 `restoring`, so nothing is served under the snapshot's settings."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.sealed: str | None = None  # the reason, while sealed
        self.set(policy or Policy())

    def set(self, policy: Policy) -> None:
        self.policy = policy
        self.checks = (policy.hosts(), frozenset(policy.allowed_origins),
                       policy.api_key.encode() if policy.api_key else None)

    def seal(self, reason: str) -> None:
        self.sealed = reason

    def unseal(self) -> None:
        self.sealed = None


def guard(app: ASGIApp, policy: Policy | Gate) -> ASGIApp:
    """`app` behind the checks above (HTTP only; lifespan passes through).  A `Gate` lets the
    policy change, or the server be sealed, while it serves."""
    gate = policy if isinstance(policy, Gate) else Gate(policy)

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        hosts, origins, key = gate.checks
        refusal = _sealed(gate.sealed) if gate.sealed else _refusal(scope, headers, hosts, origins, key)
        cors = origin is not None and origin.lower() in origins
        if refusal is not None:
            response: Response = JSONResponse(refusal.body(), refusal.status, headers=refusal.headers)
        elif cors and scope["method"] == "OPTIONS":
            response = Response(status_code=204, headers={
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "authorization, content-type",
                "Access-Control-Max-Age": "600"})
        else:
            await app(scope, receive, _with_cors(send, origin) if cors else send)
            return
        if cors:
            response.headers.update(_cors_headers(origin or ""))
        await response(scope, receive, send)

    return guarded


def _sealed(reason: str) -> ApiError:
    return ApiError(503, f"The server is not serving yet: {reason}; retry in a moment.",
                    type="server_error", code="restoring", headers={"Retry-After": "1"})


def _refusal(scope: Scope, headers: dict[str, str], hosts: frozenset[str],
             origins: frozenset[str], key: bytes | None) -> ApiError | None:
    host = headers.get("host")
    if host is not None and _host_name(host) not in hosts:
        return ApiError(403, f"The Host header {host!r} is not a name of this server; use "
                        "localhost or 127.0.0.1, or start the server with --allowed-host NAME.",
                        code="host_not_allowed")
    origin = headers.get("origin")
    if origin is not None and origin.lower() not in origins and not _same_origin(origin, scope, host):
        return ApiError(403, f"Requests from the web origin {origin!r} are refused; start the "
                        "server with --allowed-origin ORIGIN to let that page use it.",
                        code="origin_not_allowed")
    if key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            what = "a wrong API key" if given else "no API key"
            return ApiError(401, f"The request carries {what}; send the server's key as "
                            "'Authorization: Bearer KEY' (the openai client's api_key).",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if scope["method"] == "POST":
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return ApiError(415, f"The body's Content-Type is {media or 'missing'!r}; send the "
                            "JSON body with 'Content-Type: application/json'.",
                            code="unsupported_media_type")
    return None


def _host_name(host: str) -> str:
    """The name in a Host header: `[::1]:8080` -> `::1`, `Example.com:80` -> `example.com`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _same_origin(origin: str, scope: Scope, host: str | None) -> bool:
    return host is not None and origin.lower() == f"{scope.get('scheme', 'http')}://{host.lower()}"


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def _with_cors(send: Send, origin: str | None) -> Send:
    extra = [(k.lower().encode(), v.encode()) for k, v in _cors_headers(origin or "").items()]

    async def sending(message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending
