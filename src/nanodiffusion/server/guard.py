"""Request guards in front of every route: allowed hosts, HTTP basic auth, same-origin writes, body size and time.

A server on loopback is still reachable by any web page the user opens, so: writes (POST/PUT/PATCH/
DELETE) whose Origin header names another host than the Host header get 403, and, unless it listens on every
interface, a Host header naming anything but a loopback address (127.0.0.0/8, ::1, localhost) or the bind
address gets 403 (DNS rebinding). Every response forbids framing by other sites (clickjacking), and a body
that stops arriving for `body_timeout` seconds gets 408 instead of holding the connection forever.

Two logins, as in the popular web UI: `credentials` (--api-auth) lock the API (API_PREFIXES), `ui_credentials`
(--gradio-auth) lock everything else (the web page and its own routes). Origins named by --cors-allow-origins /
--cors-allow-origins-regex may write cross-origin (the CORS middleware answers their browsers, app.py).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import secrets
from urllib.parse import urlsplit

import anyio

from ..errors import NanoDiffusionError
from .errors import error_body

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
EVERY_INTERFACE = {"0.0.0.0", "::", ""}
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff")]
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
API_PREFIXES = ("/sdapi/", "/internal/", "/controlnet/", "/docs", "/openapi.json")


def parse_auth(text: str | None, flag: str = "--api-auth") -> list[tuple[str, str]] | None:
    """"user:pass[,user2:pass2]" -> [(user, pass), ...]; None -> no auth."""
    if not text:
        return None
    pairs = [item.partition(":") for item in text.split(",")]
    if any(not user or not sep or not password for user, sep, password in pairs):
        raise NanoDiffusionError(f"{flag} must look like USER:PASS (several: USER:PASS,USER2:PASS2)")
    return [(user, password) for user, _, password in pairs]


def cross_origin_allowed(origin: str, origins: list[str] | None, regex: str | None) -> bool:
    """Whether --cors-allow-origins (exact) or --cors-allow-origins-regex (full match) names this origin."""
    return origin in (origins or []) or bool(regex and re.fullmatch(regex, origin))


def is_api(path: str) -> bool:
    """Whether a path belongs to the API (locked by --api-auth) rather than the web page (--gradio-auth)."""
    return path.startswith(API_PREFIXES)


def authority(host: str, scheme: str) -> tuple[str, int | None]:
    """(hostname, port) of a "host[:port]" string, with the scheme's default port filled in."""
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    return (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme)


def is_loopback(host: str) -> bool:
    """localhost, any 127.0.0.0/8 address, ::1 (also written as an IPv4-mapped IPv6 address)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def allowed_hosts_for(bind: str) -> set[str] | None:
    """Host names a server bound to `bind` answers to: loopback and the bind address; None (any) on every
    interface, where the server is meant for others and only --api-auth protects it."""
    bind = bind.strip("[]").lower()
    return None if bind in EVERY_INTERFACE else LOOPBACK_HOSTS | {bind}


class Guard:
    """ASGI middleware: reject bad requests before they reach the app (403 / 401 / 413)."""

    def __init__(self, app, *, credentials: list[tuple[str, str]] | None = None,
                 ui_credentials: list[tuple[str, str]] | None = None, max_body: int = 32 << 20,
                 allowed_hosts: set[str] | None = None, body_timeout: float = 10.0,
                 cors_origins: list[str] | None = None, cors_regex: str | None = None) -> None:
        self.app = app
        self.credentials = credentials
        self.ui_credentials = ui_credentials
        self.cors_origins = cors_origins
        self.cors_regex = cors_regex
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = secure(send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        problem = self.problem(scope, headers)
        if problem is None:
            body, problem = await self.read_body(receive, headers)
        if problem is not None:
            await reject(send, *problem)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def problem(self, scope, headers: dict[str, str]) -> tuple[int, str, dict[str, str]] | None:
        """The first check the request fails, as (status, message, extra headers), or None."""
        scheme = scope.get("scheme", "http")
        host = authority(headers.get("host", ""), scheme)
        if self.allowed_hosts is not None and host[0] not in self.allowed_hosts and not is_loopback(host[0]):
            return 403, (f"host {host[0]!r} is not allowed: this server answers to loopback and its bind address "
                         "only; use --listen to serve others"), {}
        credentials = self.credentials if is_api(scope.get("path", "")) else self.ui_credentials
        if credentials is not None and not self.authorized(headers.get("authorization", ""), credentials):
            return 401, "authentication required", {"www-authenticate": 'Basic realm="nanodiffusion"'}
        origin = headers.get("origin")
        if (scope["method"] not in SAFE_METHODS and origin is not None
                and not cross_origin_allowed(origin, self.cors_origins, self.cors_regex)):
            parts = urlsplit(origin)
            if parts.scheme != scheme or authority(parts.netloc, parts.scheme) != host:
                return 403, f"cross-origin request from {origin} refused", {}
        return None

    def authorized(self, header: str, credentials: list[tuple[str, str]]) -> bool:
        """Check an "Authorization: Basic ..." header against every given user in constant time."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        matches = [secrets.compare_digest(user.encode(), u.encode())
                   & secrets.compare_digest(password.encode(), p.encode())
                   for u, p in credentials]
        return any(matches)

    async def read_body(self, receive, headers: dict[str, str]) -> tuple[bytes, tuple[int, str, dict] | None]:
        """Read the whole body, refusing it as soon as it passes the limit (413) or stalls (408)."""
        too_large = 413, f"request body larger than {self.max_body} bytes", {}
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            return b"", too_large
        chunks, size = [], 0
        while True:
            message = None
            with anyio.move_on_after(self.body_timeout):
                message = await receive()
            if message is None:
                return b"", (408, f"request body stalled: nothing received for {self.body_timeout:g} s", {})
            if message["type"] != "http.request":
                return b"", (400, "client disconnected", {})
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return b"", too_large
            if not message.get("more_body", False):
                return b"".join(chunks), None


def secure(send):
    """Wrap an ASGI send so every response carries SECURITY_HEADERS (unless the app set them itself)."""

    async def send_secure(message) -> None:
        if message["type"] == "http.response.start":
            present = {key.lower() for key, _ in message.get("headers", [])}
            extra = [(key, value) for key, value in SECURITY_HEADERS if key not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return send_secure


async def reject(send, status: int, message: str, headers: dict[str, str]) -> None:
    """Answer in the web UI's error shape, like the app's own errors (server/errors.py)."""
    body = json.dumps(error_body("HTTPException", status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(key.encode(), value.encode()) for key, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
