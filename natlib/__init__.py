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
- :mod:`natlib.birthday`: hard↔easy NAT probing plans and their odds.
- :mod:`natlib.testing`: a NAT lab in network namespaces, with pytest fixtures.

natlib logs through ``logging.getLogger("natlib....")`` and never configures handlers.
"""

import logging

from .keys import DiscoPrivateKey, DiscoPublicKey, KeyFormatError, NodePrivateKey, NodePublicKey

__all__ = ["DiscoPrivateKey", "DiscoPublicKey", "KeyFormatError", "NodePrivateKey", "NodePublicKey"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
