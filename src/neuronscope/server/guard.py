"""ASGI middleware that makes the Monitor safe on a shared port: body cap, Host check, client token.

- Request bodies over `max_body_bytes` get a 413 with a JSON error, decided from Content-Length when it is given
  and otherwise after reading at most `max_body_bytes + 1` bytes (the rest is never read).
- The `Host` header must name one of `allowed_hosts` (DNS rebinding: a page on another site that resolves its name
  to 127.0.0.1 must not reach the Monitor); `allowed_hosts=None` switches the check off.
- Every request carries a client token: the `X-Neuronscope-Client` header, else the `ns_client` cookie, else a new
  one (set as an HttpOnly, SameSite=Strict cookie on the response). It is put in `scope["state"]["client"]`, and
  sessions belong to the token that made them.
"""
from __future__ import annotations

import json
import re
import secrets
from typing import Any, Awaitable, Callable, Iterable

COOKIE = "ns_client"
HEADER = b"x-neuronscope-client"
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
LOOPBACK = ("127.0.0.1", "localhost", "::1")

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def host_names(host: str, extra: Iterable[str] = ()) -> set[str] | None:
    """The Host names a server bound to `host` answers to (None: any; a wildcard bind without --allow-host)."""
    extra = [h.strip().lower() for h in extra if h.strip()]
    if "*" in extra:
        return None
    h = host.strip().strip("[]").lower()
    if h in ("0.0.0.0", "::", "") and not extra:
        return None
    names = set(extra)
    if h not in ("0.0.0.0", "::", ""):
        names.add(h)
    if h in LOOPBACK or h.startswith("127."):
        names.update(LOOPBACK)
    return names


def _host_of(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _json(send, status: int, error: str, headers: list | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, allowed_hosts: set[str] | None):
        self.app, self.max_body, self.allowed = app, int(max_body_bytes), allowed_hosts

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.allowed is not None:
            host = _host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                await _json(send, 400, f"The Host header '{host[:80]}' is not an address of this server; start it "
                                       f"with --allow-host {host[:80] or 'NAME'} to allow it.")
                return
        # the body, capped
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0 or n > self.max_body:
                await _json(send, 413, f"The request body has {length.decode('latin-1')[:20]} bytes; the limit is "
                                       f"{self.max_body} bytes.")
                return
        chunks: list[dict] = []
        total = 0
        if scope.get("method", "GET") in ("POST", "PUT", "PATCH", "DELETE"):
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    chunks.append(msg)
                    break
                total += len(msg.get("body", b""))
                if total > self.max_body:
                    await _json(send, 413, f"The request body is over the limit of {self.max_body} bytes.")
                    return
                chunks.append(msg)
                if not msg.get("more_body", False):
                    break

        async def replay():
            if chunks:
                return chunks.pop(0)
            return await receive()

        # the client token
        token = headers.get(HEADER, b"").decode("latin-1")
        if not TOKEN_RE.match(token):
            token = _cookie(headers.get(b"cookie", b"").decode("latin-1"))
        minted = not TOKEN_RE.match(token or "")
        if minted:
            token = secrets.token_urlsafe(24)
        scope.setdefault("state", {})["client"] = token

        async def send_with_cookie(msg):
            if minted and msg["type"] == "http.response.start":
                cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age=31536000"
                msg = {**msg, "headers": [*msg.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(msg)
        await self.app(scope, replay, send_with_cookie)


def _cookie(header: str) -> str:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == COOKIE:
            return v
    return ""
