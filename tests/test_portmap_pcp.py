"""natlib.portmap._pcp: the PCP (RFC 6887) codec, byte for byte, and every result code."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natlib.portmap import PcpResult, PortMapParseError
from natlib.portmap._pcp import (
    PcpMapData,
    PcpNonceMismatchError,
    PcpResponse,
    encode_announce_request,
    encode_map_request,
    new_nonce,
    parse_map_response,
    parse_response,
)

NONCE = bytes(range(1, 13))
V4MAPPED = "00000000000000000000ffff"


def response_header(opcode: int, result: int, lifetime: int, epoch: int) -> bytes:
    return struct.pack("!BBBBII12x", 2, 0x80 | opcode, 0, result, lifetime, epoch)


def map_data(nonce: bytes, internal: int, external: int, ip: str) -> bytes:
    packed = b"\0" * 10 + b"\xff\xff" + ipaddress.IPv4Address(ip).packed
    return nonce + struct.pack("!B3xHH", 17, internal, external) + packed


def test_announce_request_bytes() -> None:
    assert encode_announce_request("192.168.1.2") == bytes.fromhex(f"02 00 0000 00000000 {V4MAPPED} c0a80102")


def test_map_request_bytes() -> None:
    request = encode_map_request("192.168.1.2", NONCE, 41641, suggested_external_port=41641, lifetime=7200)
    assert request == bytes.fromhex(
        f"02 01 0000 00001c20 {V4MAPPED} c0a80102"  # header: version, MAP, lifetime, client IP
        "0102030405060708090a0b0c"  # nonce
        f"11 000000 a2a9 a2a9 {V4MAPPED} 00000000"  # UDP, ports, suggested external 0.0.0.0
    )
    assert len(request) == 60


def test_map_request_with_a_suggested_external_address_and_delete() -> None:
    request = encode_map_request("10.0.0.2", NONCE, 5000, suggested_external_ip="203.0.113.2", lifetime=0)
    assert request[4:8] == b"\0\0\0\0"
    assert request[44:60] == bytes.fromhex(f"{V4MAPPED} cb007102")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1.2.3.4", b"short", 1), "nonce"),
        (("1.2.3.4", NONCE, 0), "not mappable"),
        (("not an ip", NONCE, 1), "does not appear to be"),
    ],
)
def test_map_request_rejects_bad_arguments(args: tuple[str, bytes, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_map_request(*args)


def test_new_nonce_is_random_96_bits() -> None:
    assert len(new_nonce()) == 12
    assert new_nonce() != new_nonce()


def test_announce_response() -> None:
    data = response_header(0, 0, 0, 647)
    assert parse_response(data) == PcpResponse(opcode=0, result=0, lifetime=0, epoch=647, map=None)


def test_map_response_success() -> None:
    data = response_header(1, 0, 7200, 648) + map_data(NONCE, 41641, 41642, "203.0.113.2")
    response = parse_map_response(data, NONCE)
    assert response == PcpResponse(
        opcode=1,
        result=0,
        lifetime=7200,
        epoch=648,
        map=PcpMapData(NONCE, 17, 41641, 41642, ipaddress.IPv4Address("203.0.113.2")),
    )


@pytest.mark.parametrize("code", [int(c) for c in PcpResult if c])
def test_every_error_result_is_reported(code: int) -> None:
    # With the MAP data echoed (as RFC 6887 asks) and without it (as some servers do).
    with_data = response_header(1, code, 30, 9) + map_data(NONCE, 41641, 0, "0.0.0.0")
    assert parse_map_response(with_data, NONCE).result == code
    bare = response_header(1, code, 30, 9)
    assert parse_map_response(bare, NONCE) == PcpResponse(1, code, 30, 9, None)


def test_the_result_codes_a_client_acts_on() -> None:
    assert (PcpResult.NOT_AUTHORIZED, PcpResult.NO_RESOURCES, PcpResult.ADDRESS_MISMATCH) == (2, 8, 12)
    assert len(PcpResult) == 14


def test_wrong_nonce_is_refused() -> None:
    data = response_header(1, 0, 7200, 1) + map_data(bytes(12), 41641, 41642, "203.0.113.2")
    with pytest.raises(PcpNonceMismatchError):
        parse_map_response(data, NONCE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (response_header(0, 0, 0, 1)[:20], "truncated"),
        (response_header(0, 0, 0, 1) + b"\0\0", "multiple of 4"),
        (response_header(0, 0, 0, 1) + b"\0" * 1080, "max 1100"),
        (b"\x00" + response_header(0, 0, 0, 1)[1:], "version 0"),  # a NAT-PMP answer
        (b"\x02\x01" + response_header(0, 0, 0, 1)[2:], "request"),  # R bit clear
        (response_header(1, 0, 7200, 1), "without its opcode data"),  # success, no MAP data
    ],
)
def test_malformed_responses_raise_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(PortMapParseError, match=message):
        parse_response(data)


def test_map_response_to_another_opcode_is_refused() -> None:
    with pytest.raises(PortMapParseError, match="not MAP"):
        parse_map_response(response_header(0, 0, 0, 1), NONCE)


def test_ipv6_external_address_is_kept_as_ipv6() -> None:
    data = response_header(1, 0, 60, 1) + NONCE + struct.pack("!B3xHH", 17, 1, 2)
    data += ipaddress.IPv6Address("2001:db8::1").packed
    response = parse_response(data)
    assert response.map is not None
    assert response.map.external_ip == ipaddress.IPv6Address("2001:db8::1")


@given(st.binary(max_size=128))
def test_arbitrary_datagrams_parse_or_raise_parse_error(data: bytes) -> None:
    try:
        parse_map_response(data, NONCE)
    except PortMapParseError:
        pass


@given(st.binary(min_size=12, max_size=12), st.integers(1, 0xFFFF), st.integers(0, 0xFFFF))
def test_map_request_and_response_round_trip(nonce: bytes, internal: int, external: int) -> None:
    request = encode_map_request("192.168.1.2", nonce, internal, suggested_external_port=external)
    reply = response_header(1, 0, 7200, 5) + request[24:44] + bytes.fromhex(f"{V4MAPPED} cb007102")
    response = parse_map_response(reply, nonce)
    assert response.map == PcpMapData(nonce, 17, internal, external, ipaddress.IPv4Address("203.0.113.2"))
