"""The exception hierarchy of :mod:`natlib.portmap` (one base class, one subclass per failure kind)."""

from __future__ import annotations

__all__ = [
    "GatewayUnsupportedError",
    "NoGatewayError",
    "PortMapError",
    "PortMapParseError",
    "PortMapProtocolError",
    "PortMapTimeoutError",
    "PortMapUnavailableError",
    "UnusableExternalAddressError",
    "UpnpSoapFault",
    "UpnpXmlError",
]


class PortMapError(Exception):
    """Base class of every error raised by :mod:`natlib.portmap`."""


class PortMapParseError(PortMapError, ValueError):
    """A NAT-PMP, PCP, SSDP, HTTP or SOAP message could not be decoded.

    The codecs raise only subclasses of this for bad input; the driver ignores such datagrams.
    """


class UpnpXmlError(PortMapParseError):
    """An XML document (root description or SOAP envelope) is malformed, too large or hostile
    (a DTD or an entity declaration, which are refused outright)."""


class NoGatewayError(PortMapError):
    """No IPv4 default route was found, so there is no router to ask."""


class GatewayUnsupportedError(PortMapError):
    """The default gateway or our address on its subnet is not a private IPv4 address.

    Port mapping is skipped then ("gateway range likely lacks support"): such a gateway is not a
    home router, and asking it is pointless or rude.
    """


class PortMapTimeoutError(PortMapError, TimeoutError):
    """The router did not answer in time."""


class PortMapProtocolError(PortMapError):
    """The router answered with an error result code (NAT-PMP / PCP) or an HTTP error."""

    def __init__(self, message: str, *, protocol: str, code: int | None = None) -> None:
        super().__init__(message)
        self.protocol = protocol
        """``"natpmp"``, ``"pcp"`` or ``"upnp"``."""
        self.code = code
        """The protocol's numeric result code, if there was one."""


class UpnpSoapFault(PortMapProtocolError):
    """A SOAP fault from an IGD control URL; :attr:`code` is the UPnP errorCode (e.g. 718, 725)."""

    def __init__(self, code: int | None, description: str) -> None:
        super().__init__(f"UPnP error {code}: {description}", protocol="upnp", code=code)
        self.description = description


class UnusableExternalAddressError(PortMapError):
    """The router reported an external address that is not a public IPv4 address (0.0.0.0, a
    loopback, link-local, private or shared CGNAT address): the mapping would be useless, most
    likely because of a second NAT upstream ("double NAT")."""


class PortMapUnavailableError(PortMapError):
    """No allowed protocol could create a mapping; :attr:`failures` says why, per protocol."""

    def __init__(self, failures: dict[str, str]) -> None:
        detail = "; ".join(f"{p}: {why}" for p, why in failures.items()) or "no protocol allowed"
        super().__init__(f"no port mapping protocol worked ({detail})")
        self.failures = failures
