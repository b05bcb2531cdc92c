"""natlib: NAT traversal for Python programs, the Tailscale way.

Public namespaces:

- :mod:`natlib.keys`: node and disco key types with their text forms.
- :mod:`natlib.derp`: the DERP v2 wire format, handshake and client state machine (sans-io).
- :mod:`natlib.derphttp`: the DERP client driver (HTTP upgrade, TLS, WebSocket), under trio or asyncio.
- :mod:`natlib.stun`: a sans-io STUN codec over aioice's.
- :mod:`natlib.stunclient`: STUN Binding transactions, many servers over one socket (sans-io + anyio).
- :mod:`natlib.netif`: interface addresses and default routes from rtnetlink.
- :mod:`natlib.netmon`: a network change monitor (rtnetlink, debounced; polling fallback).
- :mod:`natlib.candidates`: our endpoint candidates (RFC 8445 priorities, Tailscale's gathering order
  and 5 min 10 s memory, 20–26 s refresh), sans-io plus an anyio ``Gatherer``.
- :mod:`natlib.portmap`: NAT-PMP, PCP and UPnP IGD port mapping clients.
- :mod:`natlib.derpmap`: relay maps (Tailscale DERPMap JSON, headscale YAML).
- :mod:`natlib.netcheck`: what the network allows (UDP, IPv4/IPv6, NAT kind, port mapping, relay
  latencies, home relay with hysteresis); also ``python -m natlib netcheck``.
- :mod:`natlib.disco`: disco messages (Ping, Pong, CallMeMaybe) in Tailscale's wire format.
- :mod:`natlib.path`: the per-peer path state machine (relay first, upgrade, loss-free failover).
- :mod:`natlib.conn`: the connection object, :func:`open_conn` → :class:`Conn`: datagrams to peers
  by node key over one UDP socket per family and the relays, direct when possible (also exported
  here).
- :mod:`natlib.birthday`: hard↔easy NAT probing plans and their odds.
- :mod:`natlib.testing`: a NAT lab in network namespaces, with pytest fixtures.

natlib logs through ``logging.getLogger("natlib....")`` and never configures handlers.
"""

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .keys import DiscoPrivateKey, DiscoPublicKey, KeyFormatError, NodePrivateKey, NodePublicKey

if TYPE_CHECKING:
    from .conn import (
        Conn,
        ConnClosedError,
        PathInfo,
        PingResult,
        PingTimeoutError,
        UnknownPeerError,
        open_conn,
    )

__all__ = [
    "Conn",
    "ConnClosedError",
    "DiscoPrivateKey",
    "DiscoPublicKey",
    "KeyFormatError",
    "NodePrivateKey",
    "NodePublicKey",
    "PathInfo",
    "PingResult",
    "PingTimeoutError",
    "UnknownPeerError",
    "open_conn",
]

# The connection object pulls in the whole stack (DERP client, STUN, netcheck, port mapping);
# import it on first use so that `import natlib` stays cheap for the relay and for tools.
_LAZY = frozenset(
    {"Conn", "ConnClosedError", "PathInfo", "PingResult", "PingTimeoutError", "UnknownPeerError", "open_conn"}
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(".conn", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
