"""The explorer on a network: a token, the Host header, security headers and size limits.

:class:`Guard` is an ASGI middleware around the whole app (pages, API, static files, ``/docs``):

- **Token.** When the server has one, every request must carry it: ``?token=T`` on the URL,
  ``Authorization: Bearer T``, or the cookie that ``?token=`` sets: ``HttpOnly``, ``SameSite=Lax``
  (a link from elsewhere still opens the page; no other site's request carries it), named after
  the port (two servers on one machine keep one each). A page opened with ``?token=T`` is
  redirected to its URL without it (303), so the token leaves the address bar and the history.
  It is compared in constant time (``hmac.compare_digest``); a missing or wrong token gets 401
  and no data. ``serve`` makes one whenever it binds to an address that is not loopback (printed
  in the URL), or takes ``--token`` / ``$INSTATTR_TOKEN``; on loopback none is needed unless one
  is given.
- **Host.** On loopback the ``Host`` header must name this machine (``localhost``, ``127.0.0.1``,
  ``::1`` or the bound name): a web page the user visits cannot reach the server through DNS
  rebinding (a name of its own resolving to 127.0.0.1), as Jupyter checks too. Anything else: 400.
- **Headers.** A strict Content-Security-Policy (everything from this origin, no inline script or
  style, no framing, forms post back here only), ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY``, ``Cross-Origin-Opener-Policy`` and
  ``Cross-Origin-Resource-Policy: same-origin`` on every answer. No CORS header is ever sent, so a
  page on another origin cannot read an answer.
- **Other sites.** A browser request that another site's page makes (``Sec-Fetch-Site:
  cross-site``: an image, a script, a fetch, a form) gets 403, so no page can make the server
  work on its behalf; only a link followed to a page may cross.
- **Size.** A request body over ``max_body`` bytes gets 413 (by its Content-Length, or while it is
  read). Text length and the live queue are limited where they are used (:mod:`.app`, :mod:`.live`).
- **HTTP only.** A WebSocket is closed unanswered.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from typing import Iterable, Optional
from urllib.parse import parse_qs

COOKIE = "instattr_token"                  # + "_{port}"
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")  # what travels unescaped in a URL and a cookie
MAX_BODY = 64 * 1024
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
           (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin")]
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MACHINE = ("/api", "/openapi.json", "/static/", "/docs-assets/", "/figures/")   # read by programs: no redirect


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def check_token(token: str) -> str:
    """``token`` if it can travel in a URL and a cookie as it is, else a one-line error."""
    from .errors import BadInput
    if not TOKEN_CHARS.fullmatch(token):
        raise BadInput("the token may hold letters, digits and . _ ~ - only (it travels in URLs and cookies)")
    return token


def cookie_name(scope) -> str:
    """The token cookie of the server answering ``scope`` (cookies do not tell ports apart)."""
    server = scope.get("server")
    return f"{COOKIE}_{server[1]}" if server and server[1] else COOKIE


def host_of(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware (see the module docstring): ``token`` None requires none; ``hosts`` None
    checks no Host header."""

    def __init__(self, app, token: Optional[str] = None, hosts: Optional[Iterable[str]] = None,
                 max_body: int = MAX_BODY):
        self.app, self.token, self.max_body = app, None if token is None else check_token(token), int(max_body)
        self.hosts = None if hosts is None else {h.strip("[]").lower() for h in hosts}

    def _cookie(self, scope) -> tuple:
        return (b"set-cookie", f"{cookie_name(scope)}={self.token}; Path=/; HttpOnly; SameSite=Lax".encode())

    def __getattr__(self, name):
        if name == "app":
            raise AttributeError(name)
        return getattr(self.app, name)        # the wrapped app's state, routes, openapi()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            await receive()
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.hosts is not None and host_of(headers.get("host", "")) not in self.hosts:
            return await _plain(send, 400, "this server answers requests addressed to this machine only "
                                           "(the Host header names another)")
        remember = False
        if self.token is not None:
            given, from_query = _token_of(scope, headers, cookie_name(scope))
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await _plain(send, 401, "a token is required: open the URL instattr serve printed "
                                               "(?token=...), or send Authorization: Bearer TOKEN",
                                    [(b"www-authenticate", b"Bearer")])
            remember = from_query
        if headers.get("sec-fetch-site") == "cross-site" and not (
                headers.get("sec-fetch-mode") == "navigate" and scope.get("method") in ("GET", "HEAD")):
            return await _plain(send, 403, "requests that another site's page makes are refused (only a link to a "
                                           "page may cross)")
        if remember and scope.get("method") in ("GET", "HEAD") and not scope.get("path", "").startswith(MACHINE):
            return await _plain(send, 303, "the token is kept in a cookie now",
                                [(b"location", _without_token(scope)), self._cookie(scope)])
        too_large = f"the request body is over {self.max_body} bytes"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _plain(send, 413, too_large)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:      # the app's handler answers it (413), like any HTTP error
                    from starlette.exceptions import HTTPException
                    raise HTTPException(413, too_large)
            return message

        async def secured(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = list(HEADERS)
                if remember:
                    extra.append(self._cookie(scope))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)
        try:
            await self.app(scope, counted, secured)
        except Exception as e:      # noqa: BLE001 - what the app left unanswered: 413 or 500, headers on
            if started:
                raise
            from starlette.exceptions import HTTPException
            if isinstance(e, HTTPException) and e.status_code == 413:
                return await _plain(send, 413, too_large)
            await _plain(send, 500, "internal server error")
            raise


def _without_token(scope) -> bytes:
    """The request's path and query, percent-encoded as it came, without ``token``."""
    from urllib.parse import parse_qsl, urlencode
    path = scope.get("raw_path") or scope.get("path", "/").encode()
    rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            if k != "token"]
    return path + (("?" + urlencode(rest)).encode("latin-1") if rest else b"")


def _token_of(scope, headers, cookie: str) -> tuple:
    """(the token the request carries or None, whether it came on the URL)."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0], True
    for part in headers.get("cookie", "").split(";"):      # lenient: one bad cookie spoils no other
        name, eq, value = part.strip().partition("=")
        if eq and name.strip() == cookie:
            return value.strip().strip('"'), False
    return None, False


async def _plain(send, status: int, text: str, extra=()) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *extra, *HEADERS]})
    await send({"type": "http.response.body", "body": body})
