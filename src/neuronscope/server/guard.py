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
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = dict[bytes, bytes]
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


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


async def _json(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The middleware: refuses a foreign Host (400) and an over-long body (413), gives every request its client
    token."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, allowed_hosts: set[str] | None) -> None:
        self.app, self.max_body, self.allowed = app, int(max_body_bytes), allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        refusal = self._host_refusal(headers)
        if refusal is not None:
            await _json(send, 400, refusal)
            return
        refusal = self._length_refusal(headers)
        if refusal is not None:
            await _json(send, 413, refusal)
            return
        chunks: list[Message] = []
        if scope.get("method", "GET") in BODY_METHODS and not await self._read_body(receive, chunks):
            await _json(send, 413, f"The request body is over the limit of {self.max_body} bytes.")
            return

        async def replay() -> Message:
            if chunks:
                return chunks.pop(0)
            return await receive()

        token, minted = client_token(headers)
        scope.setdefault("state", {})["client"] = token

        async def send_with_cookie(msg: Message) -> None:
            if minted and msg["type"] == "http.response.start":
                cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age=31536000"
                msg = {**msg, "headers": [*msg.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(msg)
        await self.app(scope, replay, send_with_cookie)

    def _host_refusal(self, headers: Headers) -> str | None:
        """The sentence for a Host that is not one of this server's names, else None."""
        if self.allowed is None:
            return None
        host = _host_of(headers.get(b"host", b"").decode("latin-1"))
        if host in self.allowed:
            return None
        return (f"The Host header '{host[:80]}' is not an address of this server; start it "
                f"with --allow-host {host[:80] or 'NAME'} to allow it.")

    def _length_refusal(self, headers: Headers) -> str | None:
        """The sentence for a Content-Length over the limit (or not a number), else None."""
        length = headers.get(b"content-length")
        if length is None:
            return None
        try:
            n = int(length)
        except ValueError:
            n = -1
        if 0 <= n <= self.max_body:
            return None
        return f"The request body has {length.decode('latin-1')[:20]} bytes; the limit is {self.max_body} bytes."

    async def _read_body(self, receive: Receive, chunks: list[Message]) -> bool:
        """Read the body's messages into `chunks`, at most the limit + 1 bytes; False when it is over the limit."""
        total = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                chunks.append(msg)
                return True
            total += len(msg.get("body", b""))
            if total > self.max_body:
                return False
            chunks.append(msg)
            if not msg.get("more_body", False):
                return True


def client_token(headers: Headers) -> tuple[str, bool]:
    """The request's client token (header, else cookie) and False; or a new one and True when it has none."""
    token = headers.get(HEADER, b"").decode("latin-1")
    if not TOKEN_RE.match(token):
        token = _cookie(headers.get(b"cookie", b"").decode("latin-1"))
    if TOKEN_RE.match(token or ""):
        return token, False
    return secrets.token_urlsafe(24), True


def _cookie(header: str) -> str:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == COOKIE:
            return v
    return ""
