"""natlib.portmap._natpmp: the NAT-PMP (RFC 6886) codec, byte for byte."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natlib.portmap import NatPmpResult, PortMapParseError
from natlib.portmap._natpmp import (
    ExternalAddressResponse,
    MapResponse,
    encode_external_address_request,
    encode_map_request,
    parse_response,
)


def test_external_address_request_is_two_zero_bytes() -> None:
    assert encode_external_address_request() == b"\x00\x00"


def test_map_request_bytes() -> None:
    assert encode_map_request(41641, suggested_external_port=41642, lifetime=7200) == bytes.fromhex(
        "00 01 0000 a2a9 a2aa 00001c20"
    )
    assert encode_map_request(5000, protocol="tcp", lifetime=60) == bytes.fromhex(
        "00 02 0000 1388 0000 0000003c"
    )


def test_delete_request_has_lifetime_zero() -> None:
    assert encode_map_request(41641, lifetime=0) == bytes.fromhex("00 01 0000 a2a9 0000 00000000")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"internal_port": 0}, "not mappable"),
        ({"internal_port": 70000}, "not a port"),
        ({"internal_port": 1, "suggested_external_port": -1}, "not a port"),
        ({"internal_port": 1, "lifetime": -1}, "lifetime"),
        ({"internal_port": 1, "lifetime": 1 << 32}, "lifetime"),
    ],
)
def test_map_request_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    internal = kwargs.pop("internal_port")
    with pytest.raises(ValueError, match=message):
        encode_map_request(
            internal,
            suggested_external_port=kwargs.get("suggested_external_port", 0),
            lifetime=kwargs.get("lifetime", 7200),
        )


def test_external_address_response() -> None:
    data = bytes.fromhex("00 80 0000 000004d2 cb007102")
    assert parse_response(data) == ExternalAddressResponse(
        result=0, epoch=1234, external_ip=ipaddress.IPv4Address("203.0.113.2")
    )


def test_map_response() -> None:
    data = bytes.fromhex("00 81 0000 000004d2 a2a9 a2aa 00001c20")
    assert parse_response(data) == MapResponse("udp", 0, 1234, 41641, 41642, 7200)
    tcp = bytes.fromhex("00 82 0000 00000001 0050 1f90 0000003c")
    assert parse_response(tcp) == MapResponse("tcp", 0, 1, 80, 8080, 60)


@pytest.mark.parametrize("code", [int(c) for c in NatPmpResult if c] + [99])
def test_every_error_result_is_reported_not_raised(code: int) -> None:
    # Full-length error answers carry the result and zeroes; short (8-byte) ones are accepted too.
    full = struct.pack("!BBHIHHI", 0, 0x81, code, 7, 0, 0, 0)
    assert parse_response(full) == MapResponse("udp", code, 7, 0, 0, 0)
    assert parse_response(full[:8]) == MapResponse("udp", code, 7, 0, 0, 0)
    external = struct.pack("!BBHI", 0, 0x80, code, 7)
    assert parse_response(external) == ExternalAddressResponse(result=code, epoch=7, external_ip=None)


def test_result_names_follow_the_rfc() -> None:
    assert [c.name for c in NatPmpResult] == [
        "SUCCESS",
        "UNSUPPORTED_VERSION",
        "NOT_AUTHORIZED",
        "NETWORK_FAILURE",
        "OUT_OF_RESOURCES",
        "UNSUPPORTED_OPCODE",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (bytes.fromhex("00 80 0000 000004"), "truncated"),  # 7 bytes
        (bytes.fromhex("00 80 0000 000004d2 cb00"), "truncated"),  # success without the address
        (bytes.fromhex("00 81 0000 000004d2 a2a9 a2aa"), "truncated"),  # success without the lifetime
        (bytes.fromhex("02 80 0000 000004d2 cb007102"), "version 2"),  # PCP, not NAT-PMP
        (bytes.fromhex("00 01 0000 a2a9 a2aa 00001c20"), "request"),  # our own request echoed
        (bytes.fromhex("00 83 0000 000004d2 a2a9 a2aa 00001c20"), "unknown opcode 3"),
    ],
)
def test_malformed_responses_raise_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(PortMapParseError, match=message):
        parse_response(data)


def test_trailing_bytes_are_ignored() -> None:
    data = bytes.fromhex("00 80 0000 000004d2 cb007102") + b"junk"
    assert parse_response(data) == ExternalAddressResponse(0, 1234, ipaddress.IPv4Address("203.0.113.2"))


@given(st.binary(max_size=64))
def test_arbitrary_datagrams_parse_or_raise_parse_error(data: bytes) -> None:
    try:
        response = parse_response(data)
    except PortMapParseError:
        return
    assert isinstance(response, ExternalAddressResponse | MapResponse)


@given(
    st.integers(1, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
)
def test_map_response_round_trip(internal: int, external: int, lifetime: int, epoch: int) -> None:
    request = encode_map_request(internal, suggested_external_port=external, lifetime=lifetime)
    assert struct.unpack("!BBHHHI", request) == (0, 1, 0, internal, external, lifetime)
    reply = struct.pack("!BBHIHHI", 0, 0x81, 0, epoch, internal, external, lifetime)
    assert parse_response(reply) == MapResponse("udp", 0, epoch, internal, external, lifetime)
