"""A sans-io UPnP IGD codec: SSDP search, root description, SOAP control messages.

Three message kinds, all bytes in and values out:

* **SSDP** (UDP to 239.255.255.250:1900 or to the gateway's port 1900):
  :func:`encode_msearch` builds an ``M-SEARCH`` (``MAN: "ssdp:discover"``, ``MX``, ``ST``), and
  :func:`parse_ssdp_response` decodes a ``HTTP/1.1 200`` answer into an :class:`SsdpResponse`
  (``LOCATION``, ``ST``, ``USN``, ``SERVER``; header names are case-insensitive).
* **Root description** (XML fetched from the SSDP location): :func:`parse_root_description` lists
  the WAN connection services with absolute control URLs, and :func:`choose_service` picks one:
  WANIPConnection:2, then WANIPConnection:1, then WANPPPConnection:1, then the legacy DSL-Forum
  WANPPPConnection.
* **SOAP** (HTTP POST to the control URL): :func:`encode_soap_request` builds the envelope and
  headers of an action (:func:`add_port_mapping_args` and friends give the arguments in the order
  the spec requires), :func:`parse_soap_response` returns the output arguments of a
  ``<Action>Response`` or raises :class:`~natlib.portmap.UpnpSoapFault` with the UPnP errorCode
  (718 ConflictInMappingEntry, 725 OnlyPermanentLeasesSupported, 402 Invalid Args...).

XML from the network is parsed with pyexpat directly, not through ``xml.etree``'s own parser, so
that a document type declaration, any entity declaration or external entity reference is refused
before anything is expanded (no "billion laughs", no external fetches); size and nesting depth are
bounded too (:data:`MAX_XML_BYTES`, :data:`MAX_XML_DEPTH`). Every decoding failure is a
:class:`~natlib.portmap.PortMapParseError` (XML ones an :class:`~natlib.portmap.UpnpXmlError`).

The protocol string sent in mappings is the upper-case ``"UDP"``: some routers reject anything
else (§3.3).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final
from xml.parsers import expat
from xml.sax.saxutils import escape

from ._errors import PortMapParseError, UpnpSoapFault, UpnpXmlError

__all__ = [
    "IGD_V1",
    "IGD_V2",
    "MAX_SSDP_BYTES",
    "MAX_XML_BYTES",
    "MAX_XML_DEPTH",
    "SERVICE_PREFERENCE",
    "SSDP_MULTICAST",
    "SSDP_PORT",
    "ST_ALL",
    "SoapRequest",
    "SsdpResponse",
    "UpnpService",
    "XmlElement",
    "add_port_mapping_args",
    "choose_service",
    "delete_port_mapping_args",
    "encode_msearch",
    "encode_soap_request",
    "parse_root_description",
    "parse_soap_response",
    "parse_ssdp_response",
    "parse_xml",
    "rewrite_url_host",
]

SSDP_MULTICAST: Final = "239.255.255.250"
SSDP_PORT: Final = 1900
ST_ALL: Final = "ssdp:all"
IGD_V1: Final = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
IGD_V2: Final = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
WANIP_V2: Final = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANIP_V1: Final = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANPPP_V1: Final = "urn:schemas-upnp-org:service:WANPPPConnection:1"
WANPPP_DSLFORUM: Final = "urn:dslforum-org:service:WANPPPConnection:1"
SERVICE_PREFERENCE: Final = (WANIP_V2, WANIP_V1, WANPPP_V1, WANPPP_DSLFORUM)
"""Service types we can map with, best first."""

MAX_SSDP_BYTES: Final = 4096
"""SSDP answers are a few hundred bytes; a larger datagram is not one."""
MAX_XML_BYTES: Final = 64 * 1024
"""Root descriptions are a few KiB, SOAP responses less; anything bigger is refused."""
MAX_XML_DEPTH: Final = 32
"""Deeper nesting than any IGD description uses: refused (bounds the tree walk)."""

_SOAP_ENV_NS: Final = "http://schemas.xmlsoap.org/soap/envelope/"
_SOAP_ENCODING: Final = "http://schemas.xmlsoap.org/soap/encoding/"


# -- SSDP ------------------------------------------------------------------------------------------


def encode_msearch(st: str = ST_ALL, *, mx: int = 2, host: str = f"{SSDP_MULTICAST}:{SSDP_PORT}") -> bytes:
    """An SSDP ``M-SEARCH`` for search target ``st``; ``host`` is what the HOST header names."""
    if any(c in st or c in host for c in "\r\n"):
        raise ValueError("SSDP header values must not contain line breaks")
    if not 1 <= mx <= 5:
        raise ValueError(f"MX {mx} out of the 1..5 range of UPnP 1.1")
    return (
        f'M-SEARCH * HTTP/1.1\r\nHOST: {host}\r\nST: {st}\r\nMAN: "ssdp:discover"\r\nMX: {mx}\r\n\r\n'
    ).encode("ascii")


@dataclass(frozen=True, slots=True)
class SsdpResponse:
    """A decoded answer to an M-SEARCH."""

    location: str
    """The root description URL (``http://host:port/path``)."""
    st: str
    usn: str
    server: str

    @property
    def igd_version(self) -> int | None:
        """2 or 1 when the answer names an InternetGatewayDevice (or one of its WAN services) of
        that version in ST or USN; 1 for a WAN connection service; None for anything else."""
        text = f"{self.st} {self.usn}"
        if IGD_V2 in text or WANIP_V2 in text:
            return 2
        if IGD_V1 in text or WANIP_V1 in text or "WANPPPConnection:1" in text:
            return 1
        return None


def parse_ssdp_response(data: bytes | bytearray | memoryview) -> SsdpResponse:
    """Decode an SSDP search response; raises :class:`PortMapParseError` for anything else
    (NOTIFY announcements, other M-SEARCHes, HTTP errors, a missing or non-http LOCATION)."""
    raw = bytes(data)
    if len(raw) > MAX_SSDP_BYTES:
        raise PortMapParseError(f"SSDP datagram of {len(raw)} bytes is too large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PortMapParseError("SSDP datagram is not UTF-8 text") from None
    lines = text.replace("\r\n", "\n").split("\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].upper().startswith("HTTP/1.") or status[1] != "200":
        raise PortMapParseError(f"not an SSDP search response: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            break
        name, sep, value = line.partition(":")
        if not sep:
            raise PortMapParseError(f"malformed SSDP header line {line[:60]!r}")
        headers.setdefault(name.strip().lower(), value.strip())
    location = headers.get("location", "")
    url = urllib.parse.urlsplit(location)
    if url.scheme.lower() != "http" or not url.hostname:
        raise PortMapParseError(f"SSDP LOCATION {location[:100]!r} is not an http URL")
    try:
        _ = url.port
    except ValueError:
        raise PortMapParseError(f"SSDP LOCATION {location[:100]!r} has a bad port") from None
    return SsdpResponse(
        location=location,
        st=headers.get("st", ""),
        usn=headers.get("usn", ""),
        server=headers.get("server", ""),
    )


def rewrite_url_host(url: str, host: str) -> str:
    """``url`` with its host replaced by ``host`` (the gateway), keeping port, path and query.

    Some routers advertise a description or control URL on another, "floating" address (§3.3); we
    only ever talk HTTP to the gateway itself.
    """
    parts = urllib.parse.urlsplit(url)
    ip = ipaddress.ip_address(host)
    hostpart = f"[{ip}]" if ip.version == 6 else str(ip)
    try:
        port = parts.port
    except ValueError:
        raise PortMapParseError(f"URL {url[:100]!r} has a bad port") from None
    netloc = f"{hostpart}:{port}" if port is not None else hostpart
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


# -- safe XML --------------------------------------------------------------------------------------


@dataclass(slots=True)
class XmlElement:
    """A namespace-stripped XML element: local tag name, text and children (nothing else)."""

    tag: str
    text: str
    children: list[XmlElement]

    def find(self, tag: str) -> XmlElement | None:
        """The first direct child named ``tag``."""
        return next((c for c in self.children if c.tag == tag), None)

    def child_text(self, tag: str) -> str | None:
        child = self.find(tag)
        return child.text.strip() if child is not None else None

    def iter(self, tag: str) -> Iterator[XmlElement]:
        """Every descendant (and self) named ``tag``, in document order, without recursion."""
        stack = [self]
        while stack:
            node = stack.pop()
            if node.tag == tag:
                yield node
            stack.extend(reversed(node.children))


def _forbidden(what: str) -> UpnpXmlError:
    return UpnpXmlError(f"XML with {what} refused")


def parse_xml(data: bytes | bytearray | memoryview, *, limit: int = MAX_XML_BYTES) -> XmlElement:
    """Parse untrusted XML into an :class:`XmlElement` tree, refusing DTDs and entities.

    Raises :class:`UpnpXmlError` if ``data`` exceeds ``limit`` bytes, is not well-formed, has a
    document type declaration, an entity declaration or reference to an external entity, or is
    nested deeper than :data:`MAX_XML_DEPTH`.
    """
    raw = bytes(data)
    if len(raw) > limit:
        raise UpnpXmlError(f"XML document of {len(raw)} bytes exceeds the {limit}-byte limit")
    parser = expat.ParserCreate(namespace_separator="}")
    root: list[XmlElement] = []
    stack: list[XmlElement] = []

    def start(name: str, _attrs: dict[str, str]) -> None:
        if len(stack) >= MAX_XML_DEPTH:
            raise UpnpXmlError(f"XML nested deeper than {MAX_XML_DEPTH} elements")
        element = XmlElement(name.rpartition("}")[2], "", [])
        if stack:
            stack[-1].children.append(element)
        else:
            root.append(element)
        stack.append(element)

    def end(_name: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            stack[-1].text += text

    def refuse_doctype(*_args: object) -> None:
        raise _forbidden("a document type declaration")

    def refuse_entity(*_args: object) -> None:
        raise _forbidden("an entity declaration")

    def refuse_external(*_args: object) -> int:
        raise _forbidden("an external entity reference")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_external
    try:
        parser.Parse(raw, True)
    except expat.ExpatError as e:
        raise UpnpXmlError(f"malformed XML: {e}") from None
    except (ValueError, LookupError, UnicodeError) as e:  # e.g. an unknown declared encoding
        raise UpnpXmlError(f"undecodable XML: {e}") from None
    if not root:
        raise UpnpXmlError("XML document has no root element")
    return root[0]


# -- root description ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpnpService:
    """A WAN connection service of an IGD, ready to be called."""

    service_type: str
    control_url: str
    """Absolute ``http://`` URL, its host rewritten to the gateway."""

    @property
    def version(self) -> int:
        """The service version (the number after the last colon): 2 offers AddAnyPortMapping."""
        tail = self.service_type.rpartition(":")[2]
        return int(tail) if tail.isdigit() else 1


def parse_root_description(
    data: bytes | bytearray | memoryview, location: str, gateway: str
) -> list[UpnpService]:
    """The mapping-capable services of a root description fetched from ``location``, best first.

    Control URLs are resolved against ``URLBase`` (if the document has one) or ``location``, and
    their host is rewritten to ``gateway``. Raises :class:`UpnpXmlError` for bad XML and
    :class:`PortMapParseError` if the document is not a UPnP description; a description without
    any WAN connection service gives ``[]``.
    """
    root = parse_xml(data)
    if root.tag != "root":
        raise PortMapParseError(f"UPnP description root element is <{root.tag[:40]}>, not <root>")
    base = root.child_text("URLBase") or location
    services: list[UpnpService] = []
    seen: set[tuple[str, str]] = set()
    for node in root.iter("service"):
        service_type = node.child_text("serviceType") or ""
        control = node.child_text("controlURL") or ""
        if service_type not in SERVICE_PREFERENCE or not control:
            continue
        absolute = urllib.parse.urljoin(base, control)
        if urllib.parse.urlsplit(absolute).scheme.lower() != "http":
            continue
        url = rewrite_url_host(absolute, gateway)
        if (service_type, url) not in seen:
            seen.add((service_type, url))
            services.append(UpnpService(service_type, url))
    services.sort(key=lambda s: SERVICE_PREFERENCE.index(s.service_type))
    return services


def choose_service(services: Sequence[UpnpService]) -> UpnpService | None:
    """The preferred service of ``services`` (see :data:`SERVICE_PREFERENCE`), or None."""
    ranked = sorted(
        (s for s in services if s.service_type in SERVICE_PREFERENCE),
        key=lambda s: SERVICE_PREFERENCE.index(s.service_type),
    )
    return ranked[0] if ranked else None


# -- SOAP ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoapRequest:
    """What to POST to a control URL: extra headers and the body."""

    headers: list[tuple[str, str]]
    body: bytes


def encode_soap_request(service_type: str, action: str, args: Sequence[tuple[str, str]]) -> SoapRequest:
    """A SOAP 1.1 request for ``action`` of ``service_type`` with input ``args`` in that order."""
    if not action.isidentifier():
        raise ValueError(f"bad SOAP action name {action!r}")
    params = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in args)
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{_SOAP_ENV_NS}" s:encodingStyle="{_SOAP_ENCODING}">'
        f'<s:Body><u:{action} xmlns:u="{escape(service_type, {chr(34): "&quot;"})}">{params}</u:{action}>'
        "</s:Body></s:Envelope>\r\n"
    ).encode()
    headers = [
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", f'"{service_type}#{action}"'),
    ]
    return SoapRequest(headers=headers, body=body)


def add_port_mapping_args(
    *,
    external_port: int,
    internal_port: int,
    internal_client: str,
    lease: int,
    description: str = "natlib",
) -> list[tuple[str, str]]:
    """Input arguments of AddPortMapping and AddAnyPortMapping (same list), protocol ``"UDP"``."""
    return [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", "UDP"),
        ("NewInternalPort", str(internal_port)),
        ("NewInternalClient", internal_client),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", description),
        ("NewLeaseDuration", str(lease)),
    ]


def delete_port_mapping_args(external_port: int) -> list[tuple[str, str]]:
    """Input arguments of DeletePortMapping for a UDP mapping."""
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP")]


def parse_soap_response(data: bytes | bytearray | memoryview, action: str) -> dict[str, str]:
    """The output arguments of a ``<action>Response``, by name.

    Raises :class:`~natlib.portmap.UpnpSoapFault` for a SOAP fault (with the UPnP errorCode when
    the fault has one), :class:`UpnpXmlError` for bad XML, :class:`PortMapParseError` when the
    envelope holds neither the expected response nor a fault.
    """
    root = parse_xml(data)
    if root.tag != "Envelope":
        raise PortMapParseError(f"SOAP response root element is <{root.tag[:40]}>, not <Envelope>")
    body = root.find("Body")
    if body is None:
        raise PortMapParseError("SOAP envelope has no Body")
    fault = body.find("Fault")
    if fault is not None:
        error = next(fault.iter("UPnPError"), None)
        code_text = error.child_text("errorCode") if error is not None else None
        description = (error.child_text("errorDescription") if error is not None else None) or (
            fault.child_text("faultstring") or "SOAP fault"
        )
        code = int(code_text) if code_text is not None and code_text.isdigit() else None
        raise UpnpSoapFault(code, description[:200])
    response = body.find(f"{action}Response")
    if response is None:
        raise PortMapParseError(f"SOAP body has no {action}Response")
    return {child.tag: child.text.strip() for child in response.children}
