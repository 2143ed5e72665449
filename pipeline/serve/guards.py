"""What every response of ``pipe serve`` carries, and which requests it refuses before any work.

* Security headers on every response: a Content-Security-Policy under which the page runs
  only the server's own script file (no inline script, no other origin), and no sniffing.
* Host: when the server listens on a loopback address, a request must name a loopback host
  (``Host: 127.0.0.1:PORT``, ``localhost``, ``[::1]``), so a web page whose domain is made to
  resolve to 127.0.0.1 (DNS rebinding) cannot reach the server under its own name.
* Origin: a request that costs work (``POST``) and comes from a page of another origin is
  refused with 403. A browser sends ``Origin`` with every cross-origin POST, and a plain
  multipart POST needs no CORS preflight, so without this check any page the user visits
  could make the server work. Clients that are not browsers send no ``Origin`` and pass.
"""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' blob: data:; "
       "style-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
LOOPBACK_NAMES = {"localhost", "localhost."}


def is_loopback(host: str) -> bool:
    """True for a loopback address or the name ``localhost``."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(netloc: str) -> str:
    """The host of ``host[:port]`` (IPv6 literals in brackets)."""
    try:
        return urlsplit("//" + netloc).hostname or ""
    except ValueError:
        return ""


class Guard:
    """ASGI middleware: the headers and refusals of the module docstring. ``loopback_only``: the
    server listens on a loopback address, so only loopback ``Host`` names are accepted."""

    def __init__(self, app, loopback_only: bool):
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host", "")
        if self.loopback_only and not is_loopback(_hostname(host)):
            await _refuse(send, 403, f"Host {host!r} is not this machine's; the server answers only requests to 127.0.0.1 or localhost")
            return
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            o = urlsplit(origin) if origin != "null" else None
            if o is None or o.netloc.lower() != host.lower():
                await _refuse(send, 403, f"a request from the page of another origin ({origin}) is refused; "
                                         "use the server's own page or a client that is not a browser")
                return

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers") or []) + HEADERS}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *HEADERS]})
    await send({"type": "http.response.body", "body": body})
