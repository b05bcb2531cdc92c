"""natlib.portmap._upnp: SSDP, root descriptions, SOAP, and hostile or garbage XML."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natlib.portmap import PortMapParseError, UpnpSoapFault, UpnpXmlError
from natlib.portmap._upnp import (
    MAX_XML_BYTES,
    SsdpResponse,
    UpnpService,
    add_port_mapping_args,
    choose_service,
    delete_port_mapping_args,
    encode_msearch,
    encode_soap_request,
    parse_root_description,
    parse_soap_response,
    parse_ssdp_response,
    parse_xml,
    rewrite_url_host,
)

GW = "192.168.1.1"


def description(*services: tuple[str, str], url_base: str = "") -> bytes:
    entries = "".join(
        f"<service><serviceType>{t}</serviceType><serviceId>x</serviceId><controlURL>{c}</controlURL></service>"
        for t, c in services
    )
    base = f"<URLBase>{url_base}</URLBase>" if url_base else ""
    return (
        '<?xml version="1.0"?>\n<root xmlns="urn:schemas-upnp-org:device-1-0">'
        f"<specVersion><major>1</major><minor>0</minor></specVersion>{base}"
        "<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>"
        "<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>"
        "<controlURL>/ctl/L3F</controlURL></service></serviceList>"
        "<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>"
        f"<deviceList><device><serviceList>{entries}</serviceList></device></deviceList>"
        "</device></deviceList></device></root>"
    ).encode()


WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
DSLFORUM = "urn:dslforum-org:service:WANPPPConnection:1"


# -- SSDP ------------------------------------------------------------------------------------------


def test_msearch_bytes() -> None:
    assert encode_msearch() == (
        b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: ssdp:all\r\n"
        b'MAN: "ssdp:discover"\r\nMX: 2\r\n\r\n'
    )
    unicast = encode_msearch("urn:schemas-upnp-org:device:InternetGatewayDevice:1", mx=1, host=f"{GW}:1900")
    assert unicast.splitlines()[1:5] == [
        b"HOST: 192.168.1.1:1900",
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        b'MAN: "ssdp:discover"',
        b"MX: 1",
    ]


def test_msearch_refuses_header_injection_and_bad_mx() -> None:
    with pytest.raises(ValueError, match="line breaks"):
        encode_msearch("ssdp:all\r\nX: y")
    with pytest.raises(ValueError, match="MX"):
        encode_msearch(mx=0)


def test_ssdp_response_is_parsed_case_insensitively() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
        b"st: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"Usn: uuid:abc::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n"
        b"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\nLocation: http://192.168.1.1:5000/rootDesc.xml\r\n\r\n"
    )
    answer = parse_ssdp_response(data)
    assert answer == SsdpResponse(
        location="http://192.168.1.1:5000/rootDesc.xml",
        st="urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        usn="uuid:abc::urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        server="Debian/12 UPnP/1.1 MiniUPnPd/2.3.1",
    )
    assert answer.igd_version == 1


@pytest.mark.parametrize(
    ("st", "version"),
    [
        ("urn:schemas-upnp-org:device:InternetGatewayDevice:2", 2),
        (WANIP2, 2),
        (WANIP1, 1),
        (WANPPP1, 1),
        ("upnp:rootdevice", None),
        ("urn:schemas-upnp-org:device:MediaServer:1", None),
    ],
)
def test_igd_version_of_an_answer(st: str, version: int | None) -> None:
    assert SsdpResponse("http://x/", st, "uuid:1", "").igd_version == version


def test_ssdp_response_with_bare_line_feeds() -> None:
    answer = parse_ssdp_response(b"HTTP/1.1 200 OK\nST: upnp:rootdevice\nLOCATION: http://10.0.0.1/d.xml\n\n")
    assert answer.location == "http://10.0.0.1/d.xml"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NOTIFY * HTTP/1.1\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "not an SSDP search response"),
        (b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n", "not an SSDP search response"),
        (b"HTTP/1.1 500 Error\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "not an SSDP search response"),
        (b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n", "not an http URL"),
        (b"HTTP/1.1 200 OK\r\nLOCATION: https://1.2.3.4/\r\n\r\n", "not an http URL"),
        (b"HTTP/1.1 200 OK\r\nLOCATION: http://1.2.3.4:99999/\r\n\r\n", "bad port"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed SSDP header"),
        (b"HTTP/1.1 200 OK\r\n\xff\xfe\r\n\r\n", "not UTF-8"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 1000, "too large"),
        (b"", "not an SSDP search response"),
    ],
)
def test_bad_ssdp_datagrams_raise_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(PortMapParseError, match=message):
        parse_ssdp_response(data)


def test_location_host_is_rewritten_to_the_gateway() -> None:
    assert rewrite_url_host("http://10.9.8.7:5000/rootDesc.xml", GW) == "http://192.168.1.1:5000/rootDesc.xml"
    assert rewrite_url_host("http://router.local/desc?x=1", GW) == "http://192.168.1.1/desc?x=1"
    assert rewrite_url_host("http://10.0.0.1:80", "fe80::1") == "http://[fe80::1]:80/"


@given(st.binary(max_size=600))
def test_arbitrary_ssdp_datagrams_parse_or_raise_parse_error(data: bytes) -> None:
    try:
        parse_ssdp_response(data)
    except PortMapParseError:
        pass


# -- root description ------------------------------------------------------------------------------


def test_services_are_listed_best_first_with_absolute_urls_on_the_gateway() -> None:
    xml = description(
        (WANPPP1, "/ctl/PPP"), (WANIP1, "/ctl/IPConn"), (WANIP2, "http://10.1.2.3:5000/ctl/IP2")
    )
    services = parse_root_description(xml, "http://10.1.2.3:5000/rootDesc.xml", GW)
    assert services == [
        UpnpService(WANIP2, "http://192.168.1.1:5000/ctl/IP2"),
        UpnpService(WANIP1, "http://192.168.1.1:5000/ctl/IPConn"),
        UpnpService(WANPPP1, "http://192.168.1.1:5000/ctl/PPP"),
    ]
    assert [s.version for s in services] == [2, 1, 1]
    assert choose_service(services) == services[0]


@pytest.mark.parametrize(
    ("present", "chosen"),
    [
        ((WANIP1, WANIP2), WANIP2),
        ((WANPPP1, WANIP1), WANIP1),
        ((DSLFORUM, WANPPP1), WANPPP1),
        ((DSLFORUM,), DSLFORUM),
    ],
)
def test_service_preference(present: tuple[str, ...], chosen: str) -> None:
    xml = description(*((t, f"/ctl/{i}") for i, t in enumerate(present)))
    service = choose_service(parse_root_description(xml, "http://192.168.1.1:5000/d.xml", GW))
    assert service is not None
    assert service.service_type == chosen


def test_url_base_is_honoured() -> None:
    xml = description((WANIP1, "ctl/IPConn"), url_base="http://192.168.1.1:49000/igd/")
    [service] = parse_root_description(xml, "http://192.168.1.1:5000/rootDesc.xml", GW)
    assert service.control_url == "http://192.168.1.1:49000/igd/ctl/IPConn"


def test_description_without_wan_service_gives_no_choice() -> None:
    services = parse_root_description(description(), "http://192.168.1.1/d.xml", GW)
    assert services == []
    assert choose_service(services) is None


def test_description_must_be_a_upnp_root() -> None:
    with pytest.raises(PortMapParseError, match="not <root>"):
        parse_root_description(b"<html><body>login</body></html>", "http://192.168.1.1/", GW)


# -- hostile and garbage XML -----------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<root>&lol3;</root>"""
EXTERNAL_ENTITY = (
    b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><root>&x;</root>"""
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BILLION_LAUGHS, "document type declaration"),
        (EXTERNAL_ENTITY, "document type declaration"),
        (b'<!DOCTYPE root SYSTEM "http://198.51.100.1/x.dtd"><root/>', "document type declaration"),
        ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r []><root/>'.encode("utf-16"), "document type"),
        (b"<root>&undefined;</root>", "malformed XML"),
        (b"<root><unclosed></root>", "malformed XML"),
        (b"not xml at all", "malformed XML"),
        (b"", "malformed XML"),
        (b'<?xml version="1.0" encoding="no-such-codec"?><root/>', "XML"),
        (b"<a>" * 40 + b"</a>" * 40, "nested deeper"),
        (b"<root>" + b" " * MAX_XML_BYTES + b"</root>", "exceeds"),
    ],
)
def test_hostile_or_garbage_xml_is_refused_with_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(UpnpXmlError, match=message):
        parse_xml(data)


def test_hostile_description_is_an_xml_error() -> None:
    with pytest.raises(UpnpXmlError):
        parse_root_description(BILLION_LAUGHS, "http://192.168.1.1/", GW)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_description_never_crash(data: bytes) -> None:
    try:
        parse_root_description(data, "http://192.168.1.1/", GW)
    except PortMapParseError:
        pass


@given(st.text(alphabet="<>/a=\"' &;!?x:[]", max_size=80))
def test_xml_like_garbage_never_crashes(text: str) -> None:
    try:
        parse_soap_response(text.encode(), "AddPortMapping")
    except PortMapParseError:
        pass
    except UpnpSoapFault:
        pass


# -- SOAP ------------------------------------------------------------------------------------------


def test_add_port_mapping_request_bytes() -> None:
    args = add_port_mapping_args(
        external_port=41641, internal_port=41641, internal_client="192.168.1.2", lease=7200
    )
    request = encode_soap_request(WANIP1, "AddPortMapping", args)
    assert request.headers == [
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'),
    ]
    assert request.body == (
        b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        b'<u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
        b"<NewRemoteHost></NewRemoteHost><NewExternalPort>41641</NewExternalPort>"
        b"<NewProtocol>UDP</NewProtocol><NewInternalPort>41641</NewInternalPort>"
        b"<NewInternalClient>192.168.1.2</NewInternalClient><NewEnabled>1</NewEnabled>"
        b"<NewPortMappingDescription>natlib</NewPortMappingDescription>"
        b"<NewLeaseDuration>7200</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>\r\n"
    )


def test_protocol_is_upper_case_udp_and_values_are_escaped() -> None:
    args = add_port_mapping_args(
        external_port=1, internal_port=2, internal_client="10.0.0.2", lease=0, description="a<b>&c"
    )
    assert ("NewProtocol", "UDP") in args
    body = encode_soap_request(WANIP2, "AddAnyPortMapping", args).body
    assert b"<NewPortMappingDescription>a&lt;b&gt;&amp;c</NewPortMappingDescription>" in body
    assert delete_port_mapping_args(41641) == [
        ("NewRemoteHost", ""),
        ("NewExternalPort", "41641"),
        ("NewProtocol", "UDP"),
    ]
    with pytest.raises(ValueError, match="action"):
        encode_soap_request(WANIP1, "Add<x>", [])


def envelope(inner: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        f"<s:Body>{inner}</s:Body></s:Envelope>"
    ).encode()


def test_soap_response_output_arguments() -> None:
    data = envelope(
        f'<u:GetExternalIPAddressResponse xmlns:u="{WANIP1}">'
        "<NewExternalIPAddress> 203.0.113.2 </NewExternalIPAddress></u:GetExternalIPAddressResponse>"
    )
    assert parse_soap_response(data, "GetExternalIPAddress") == {"NewExternalIPAddress": "203.0.113.2"}
    empty = envelope(f'<u:AddPortMappingResponse xmlns:u="{WANIP1}"/>')
    assert parse_soap_response(empty, "AddPortMapping") == {}


def fault(code: str, description: str) -> bytes:
    return envelope(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        f'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode>'
        f"<errorDescription>{description}</errorDescription></UPnPError></detail></s:Fault>"
    )


@pytest.mark.parametrize(
    ("code", "description"),
    [(725, "OnlyPermanentLeasesSupported"), (402, "Invalid Args"), (718, "ConflictInMappingEntry")],
)
def test_soap_faults_carry_the_upnp_error_code(code: int, description: str) -> None:
    with pytest.raises(UpnpSoapFault) as info:
        parse_soap_response(fault(str(code), description), "AddPortMapping")
    assert info.value.code == code
    assert info.value.description == description
    assert info.value.protocol == "upnp"


def test_soap_fault_without_upnp_detail() -> None:
    with pytest.raises(UpnpSoapFault) as info:
        parse_soap_response(envelope("<s:Fault><faultstring>oops</faultstring></s:Fault>"), "X")
    assert (info.value.code, info.value.description) == (None, "oops")
    with pytest.raises(UpnpSoapFault) as info:
        parse_soap_response(fault("abc", "weird"), "X")
    assert info.value.code is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<html/>", "not <Envelope>"),
        (b'<s:Envelope xmlns:s="x"/>', "no Body"),
        (envelope("<OtherResponse/>"), "no AddPortMappingResponse"),
        (b"<s:Envelope", "malformed XML"),
    ],
)
def test_unexpected_soap_responses_raise_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(PortMapParseError, match=message):
        parse_soap_response(data, "AddPortMapping")
