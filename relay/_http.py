"""HTTP routing for the relay's listeners, without I/O.

:func:`route` looks at one parsed request and decides what to do: answer it (a
:class:`Reply`), switch the connection to DERP (:class:`DerpUpgrade`) or to DERP over WebSocket
(:class:`WebSocketUpgrade`). The server module does the reading and writing.

Routes (spec §4.2–§4.5):

=========================  ====================================================================
``/derp``                  ``Upgrade: DERP`` (or ``websocket`` without the ``derp`` subprotocol,
                           for legacy clients) → raw DERP; ``websocket`` + subprotocol ``derp`` →
                           WebSocket; otherwise 426. ``-derp=false`` → 404.
``/derp/probe``,           GET/HEAD → 200 empty with ``Access-Control-Allow-Origin: *``;
``/derp/latency-check``    other methods → 405.
``/generate_204``          204; echoes a valid ``X-Tailscale-Challenge``.
``/robots.txt``            disallow everything.
anything else              the home page (``-home``: default page, ``blank``, or a redirect).
=========================  ====================================================================

On the plain-HTTP side listener of a TLS relay (``-http-port``) only ``/generate_204`` is served;
other GET/HEAD requests are redirected to HTTPS and other methods get 400. DERP is never served
there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "CHALLENGE_REQUEST_HEADER",
    "CHALLENGE_RESPONSE_HEADER",
    "DerpUpgrade",
    "Reply",
    "RouteConfig",
    "WebSocketUpgrade",
    "route",
]

CHALLENGE_REQUEST_HEADER: Final = b"x-tailscale-challenge"
CHALLENGE_RESPONSE_HEADER: Final = b"X-Tailscale-Response"
_CHALLENGE_RE: Final = re.compile(rb"[A-Za-z0-9._:\-]{0,64}")

_NO_CACHE: Final = b"no-cache, no-store, must-revalidate, no-transform, max-age=0"
_BROWSER_HEADERS: Final = [
    (b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
]
_HSTS: Final = (b"Strict-Transport-Security", b"max-age=63072000; includeSubDomains")

HOME_PAGE: Final = b"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>meshrelay</title></head>
<body>
<h1>meshrelay</h1>
<p>This is a DERP relay server: it forwards encrypted WireGuard packets between the nodes of a
mesh (Tailscale's DERP protocol, version 2), and answers STUN so that nodes can find their public
addresses.</p>
<p>It is not meant to be browsed. Point a DERP map at it; see the project's README.</p>
</body></html>
"""
ROBOTS_TXT: Final = b"User-agent: *\nDisallow: /\n"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    derp_enabled: bool = True
    home: str = ""  # "", "blank", or a URL to redirect to
    is_tls: bool = False
    http_side_listener: bool = False  # the plain port-80 listener of a TLS relay


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    route: str = "other"  # a label for metrics


@dataclass(frozen=True, slots=True)
class DerpUpgrade:
    fast_start: bool
    ideal_node: str | None


@dataclass(frozen=True, slots=True)
class WebSocketUpgrade:
    pass


def _text(status: int, body: str, route: str) -> Reply:
    return Reply(status, [(b"Content-Type", b"text/plain; charset=utf-8")], body.encode() + b"\n", route)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _generate_204(headers: list[tuple[bytes, bytes]]) -> Reply:
    out = [(b"Cache-Control", _NO_CACHE)]
    challenge = _header(headers, CHALLENGE_REQUEST_HEADER)
    if challenge is not None and _CHALLENGE_RE.fullmatch(challenge):
        out.append((CHALLENGE_RESPONSE_HEADER, b"response " + challenge))
    return Reply(204, out, b"", "generate_204")


def route(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], cfg: RouteConfig
) -> Reply | DerpUpgrade | WebSocketUpgrade:
    """Decide what to do with one request. Header names must be lowercase (h11 gives them so)."""
    path = target.split(b"?", 1)[0]
    if path == b"/generate_204":
        return _generate_204(headers)
    if cfg.http_side_listener:
        if method in (b"GET", b"HEAD"):
            host = _header(headers, b"host") or b""
            return Reply(302, [(b"Location", b"https://" + host + target)], b"", "redirect_https")
        return _text(400, "Use HTTPS", "use_https")
    if path == b"/derp":
        if not cfg.derp_enabled:
            return _text(404, "derp server disabled", "derp")
        upgrade = (_header(headers, b"upgrade") or b"").strip().lower()
        if upgrade == b"websocket":
            protos = _header(headers, b"sec-websocket-protocol") or b""
            if b"derp" in [p.strip().lower() for p in protos.split(b",")]:
                return WebSocketUpgrade()
        if upgrade in (b"derp", b"websocket"):
            ideal = _header(headers, b"ideal-node")
            fast = (_header(headers, b"derp-fast-start") or b"").strip() == b"1"
            return DerpUpgrade(fast, ideal.decode("latin-1") if ideal else None)
        return _text(426, "DERP requires connection upgrade", "derp")
    if path in (b"/derp/probe", b"/derp/latency-check"):
        if method in (b"GET", b"HEAD"):
            return Reply(200, [(b"Access-Control-Allow-Origin", b"*")], b"", "probe")
        return _text(405, "bogus probe method", "probe")
    if path == b"/robots.txt":
        return Reply(200, [(b"Content-Type", b"text/plain; charset=utf-8")], ROBOTS_TXT, "robots")
    browser = list(_BROWSER_HEADERS)
    if cfg.is_tls:
        browser.append(_HSTS)
    if cfg.home == "blank":
        return Reply(200, [(b"Content-Type", b"text/html; charset=utf-8"), *browser], b"", "home")
    if cfg.home:
        return Reply(302, [(b"Location", cfg.home.encode()), *browser], b"", "home")
    return Reply(200, [(b"Content-Type", b"text/html; charset=utf-8"), *browser], HOME_PAGE, "home")
