"""Port mapping on the home router: NAT-PMP (RFC 6886), PCP (RFC 6887) and UPnP IGD v1/v2.

A port mapping makes the router forward every UDP datagram that reaches its public address on
the mapped port to our socket, which turns even a "hard" NAT into a reachable endpoint. natlib
advertises such an address first among a node's candidates.

::

    from natlib import portmap

    result = await portmap.probe()          # ProbeResult(pmp=True, pcp=True, upnp=False, gateway=...)
    async with portmap.PortMapper(local_port) as mapper:
        mapping = await mapper.map()        # Mapping(protocol="natpmp", external=("203.0.113.2", 41641), ...)
        ...                                 # renewed at half its lifetime; released on exit

Everything runs under trio and asyncio (anyio). The protocol logic lives in sans-io codecs that
are public too, for tests and tools: :mod:`natlib.portmap` re-exports their main entry points.
Behaviour follows Tailscale's portmapper (see ../shared/docs/nat-traversal.md §3): probe all
three services within 250 ms, prefer NAT-PMP, then PCP, then UPnP, lifetime 7200 s, renew at half,
reject external addresses that are not public (double NAT), detect router reboots by the epoch,
and work around the known UPnP quirks (multicast-only or non-1900 answers, floating description
hosts, upper-case "UDP", permanent-lease-only routers answering 725 or 402).
"""

from ._client import PROBE_TIMEOUT, PortMapper, ProbeResult, probe
from ._errors import (
    GatewayUnsupportedError,
    NoGatewayError,
    PortMapError,
    PortMapParseError,
    PortMapProtocolError,
    PortMapTimeoutError,
    PortMapUnavailableError,
    UnusableExternalAddressError,
    UpnpSoapFault,
    UpnpXmlError,
)
from ._gateway import Gateway, find_gateway, parse_proc_net_route, usable_external_ip
from ._natpmp import NatPmpResult
from ._pcp import PcpResult
from ._state import DEFAULT_LIFETIME, Mapping, Protocol

__all__ = [
    "DEFAULT_LIFETIME",
    "PROBE_TIMEOUT",
    "Gateway",
    "GatewayUnsupportedError",
    "Mapping",
    "NatPmpResult",
    "NoGatewayError",
    "PcpResult",
    "PortMapError",
    "PortMapParseError",
    "PortMapProtocolError",
    "PortMapTimeoutError",
    "PortMapUnavailableError",
    "PortMapper",
    "ProbeResult",
    "Protocol",
    "UnusableExternalAddressError",
    "UpnpSoapFault",
    "UpnpXmlError",
    "find_gateway",
    "parse_proc_net_route",
    "probe",
    "usable_external_ip",
]
