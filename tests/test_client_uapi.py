"""client.uapi: exact request bytes, get-reply parsing, errno mapping, framing limits."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from client.uapi import (
    GET_REQUEST,
    NEED_DATA,
    DeviceStats,
    Endpoint,
    PeerConfig,
    ReplyReader,
    SetAccepted,
    SetRequest,
    UapiErrnoError,
    UapiProtocolError,
    encode_get,
    encode_set,
    parse_get_reply,
)
from natlib.keys import NodePrivateKey, NodePublicKey

PRIV = NodePrivateKey(bytes(range(32)))  # clamped: first byte 0x00 & 248, last (31 & 127) | 64
PEER1 = NodePublicKey(bytes([0x11]) * 32)
PEER2 = NodePublicKey(bytes([0x22]) * 32)
H1 = "11" * 32
H2 = "22" * 32

# A real reply of Debian's wireguard-go 0.0.20220316 to get=1 (one peer, keepalive on, no traffic).
REAL_GET_REPLY = (
    b"private_key=78f7e2df4d64af8da9e4816ad7546da0e61d69f9e9558c826953f70a265c3144\n"
    b"listen_port=51999\n"
    b"public_key=1e7e220730cc6685761c3d172ce771c948b2d4527aa77eedc8c724bb321dcf73\n"
    b"preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    b"protocol_version=1\n"
    b"endpoint=192.0.2.1:5\n"
    b"last_handshake_time_sec=0\n"
    b"last_handshake_time_nsec=0\n"
    b"tx_bytes=0\n"
    b"rx_bytes=0\n"
    b"persistent_keepalive_interval=25\n"
    b"allowed_ip=100.64.0.2/32\n"
    b"errno=0\n"
    b"\n"
)


def test_get_request_bytes() -> None:
    assert encode_get() == GET_REQUEST == b"get=1\n\n"


def test_set_request_full_bytes() -> None:
    request = SetRequest(
        private_key=PRIV,
        listen_port=41641,
        fwmark=51820,
        replace_peers=True,
        peers=(
            PeerConfig(
                PEER1,
                endpoint=Endpoint.parse("198.51.100.7:41641"),
                persistent_keepalive_interval=25,
                replace_allowed_ips=True,
                allowed_ips=(
                    ipaddress.ip_network("100.64.0.2/32"),
                    ipaddress.ip_network("fd7a:115c:a1e0::2/128"),
                ),
            ),
            PeerConfig(PEER2, endpoint=Endpoint.parse("[2001:db8::7]:5"), update_only=True),
        ),
    )
    assert encode_set(request) == (
        b"set=1\n"
        b"private_key=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e5f\n"
        b"listen_port=41641\n"
        b"fwmark=51820\n"
        b"replace_peers=true\n"
        b"public_key=" + H1.encode() + b"\n"
        b"endpoint=198.51.100.7:41641\n"
        b"persistent_keepalive_interval=25\n"
        b"replace_allowed_ips=true\n"
        b"allowed_ip=100.64.0.2/32\n"
        b"allowed_ip=fd7a:115c:a1e0::2/128\n"
        b"public_key=" + H2.encode() + b"\n"
        b"update_only=true\n"
        b"endpoint=[2001:db8::7]:5\n"
        b"\n"
    )


def test_set_request_remove_sends_nothing_else_for_that_peer() -> None:
    request = SetRequest(peers=(PeerConfig(PEER1, endpoint=Endpoint.parse("192.0.2.1:1"), remove=True),))
    assert encode_set(request) == b"set=1\npublic_key=" + H1.encode() + b"\nremove=true\n\n"


def test_empty_set_request_and_keepalive_zero() -> None:
    assert encode_set(SetRequest()) == b"set=1\n\n"
    request = SetRequest(peers=(PeerConfig(PEER1, persistent_keepalive_interval=0),))
    assert (
        encode_set(request) == b"set=1\npublic_key=" + H1.encode() + b"\npersistent_keepalive_interval=0\n\n"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen_port": 65536}, "listen_port 65536 is not in 0-65535"),
        ({"listen_port": -1}, "listen_port -1 is not in 0-65535"),
        ({"fwmark": 1 << 32}, "fwmark 4294967296 is not a 32-bit value"),
    ],
)
def test_set_request_rejects_out_of_range_device_values(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SetRequest(**kwargs)  # type: ignore[arg-type]


def test_peer_config_rejects_bad_keepalive() -> None:
    with pytest.raises(ValueError, match="persistent_keepalive_interval 65536 is not in 0-65535"):
        PeerConfig(PEER1, persistent_keepalive_interval=65536)


def _read(operation: str, *chunks: bytes) -> object:
    reader = ReplyReader(operation)  # type: ignore[arg-type]
    for chunk in chunks:
        assert reader.next_event() is NEED_DATA
        reader.receive_data(chunk)
    return reader.next_event()


def test_real_get_reply_parses_into_typed_stats() -> None:
    stats = _read("get", REAL_GET_REPLY)
    assert isinstance(stats, DeviceStats)
    assert stats.private_key == NodePrivateKey.from_hex(
        "78f7e2df4d64af8da9e4816ad7546da0e61d69f9e9558c826953f70a265c3144"
    )
    assert stats.public_key == stats.private_key.public
    assert stats.listen_port == 51999
    assert stats.fwmark == 0
    [peer] = stats.peers
    key = NodePublicKey.from_hex("1e7e220730cc6685761c3d172ce771c948b2d4527aa77eedc8c724bb321dcf73")
    assert peer.public_key == key
    assert stats.peer(key) is peer
    assert peer.endpoint == Endpoint(ipaddress.IPv4Address("192.0.2.1"), 5)
    assert peer.last_handshake is None
    assert (peer.rx_bytes, peer.tx_bytes) == (0, 0)
    assert peer.persistent_keepalive_interval == 25
    assert peer.allowed_ips == (ipaddress.ip_network("100.64.0.2/32"),)
    assert peer.protocol_version == 1
    with pytest.raises(KeyError):
        stats.peer(PEER1)


def test_get_reply_fed_one_byte_at_a_time() -> None:
    chunks = [REAL_GET_REPLY[i : i + 1] for i in range(len(REAL_GET_REPLY))]
    reader = ReplyReader("get")
    events = []
    for chunk in chunks:
        reader.receive_data(chunk)
        events.append(reader.next_event())
    assert all(e is NEED_DATA for e in events[:-1])
    assert isinstance(events[-1], DeviceStats)
    assert events[-1] == parse_get_reply(REAL_GET_REPLY[:-1])


def test_get_reply_with_two_peers_traffic_and_v6() -> None:
    body = (
        f"listen_port=0\nfwmark=7\n"
        f"public_key={H1}\nendpoint=[2001:db8::7]:41641\nlast_handshake_time_sec=1700000000\n"
        f"last_handshake_time_nsec=500000000\ntx_bytes=1234\nrx_bytes=5678\n"
        f"allowed_ip=100.64.0.2/32\nallowed_ip=fd7a:115c:a1e0::2/128\nallowed_ip=10.1.0.0/24\n"
        f"public_key={H2}\nsome_future_key=whatever\n"
        "errno=0\n\n"
    ).encode()
    stats = _read("get", body[:10], body[10:])
    assert isinstance(stats, DeviceStats)
    assert stats.private_key is None
    assert stats.public_key is None
    assert stats.fwmark == 7
    p1, p2 = stats.peers
    assert p1.public_key == PEER1
    assert p1.endpoint is not None
    assert p1.endpoint.text() == "[2001:db8::7]:41641"
    assert p1.last_handshake == 1700000000.5
    assert (p1.tx_bytes, p1.rx_bytes) == (1234, 5678)
    assert [str(n) for n in p1.allowed_ips] == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.1.0.0/24"]
    assert p2.public_key == PEER2
    assert p2.endpoint is None
    assert p2.allowed_ips == ()


def test_set_reply_ok_and_errno_mapping() -> None:
    assert _read("set", b"errno=0\n\n") == SetAccepted()
    with pytest.raises(UapiErrnoError) as info:
        _read("set", b"errno=-22\n\n")
    assert info.value.errno == errno.EINVAL
    assert info.value.raw_value == -22
    assert info.value.name == "EINVAL"
    assert str(info.value) == "UAPI set failed: errno=-22 (EINVAL: Invalid argument)"
    with pytest.raises(UapiErrnoError) as info:
        _read("set", b"errno=71\n\n")  # the sign does not matter
    assert info.value.name == "EPROTO"


def test_get_reply_with_errno_fails_even_after_data() -> None:
    with pytest.raises(UapiErrnoError, match=r"UAPI get failed: errno=-5 \(EIO"):
        _read("get", b"listen_port=1\nerrno=-5\n\n")


def test_bytes_after_the_reply_are_ignored() -> None:
    assert _read("set", b"errno=0\n\ngarbage") == SetAccepted()


@pytest.mark.parametrize(
    ("operation", "reply", "message"),
    [
        ("set", b"\n", "does not end with errno=N"),
        ("get", b"listen_port=1\n\n", "does not end with errno=N"),
        ("set", b"errno=zero\n\n", "errno='zero' is not a number"),
        ("set", b"errno\n\n", "line without '='"),
        ("get", b"listen_port=70000\nerrno=0\n\n", "listen_port=70000 is out of range"),
        ("get", b"listen_port=-1\nerrno=0\n\n", "listen_port='-1' is not a number"),
        ("get", b"private_key=abc\nerrno=0\n\n", "private_key is not 64 hex digits"),
        ("get", b"public_key=" + b"zz" * 32 + b"\nerrno=0\n\n", "is not 64 hex digits"),
        (
            "get",
            f"public_key={H1}\nendpoint=nonsense\nerrno=0\n\n".encode(),
            "endpoint: 'nonsense' is not ip:port",
        ),
        ("get", f"public_key={H1}\nallowed_ip=1.2.3/99\nerrno=0\n\n".encode(), "is not a prefix"),
        ("get", f"public_key={H1}\nrx_bytes={1 << 64}\nerrno=0\n\n".encode(), "out of range"),
        (
            "get",
            f"public_key={H1}\nlast_handshake_time_nsec=1000000000\nerrno=0\n\n".encode(),
            "out of range",
        ),
        ("get", "listen_port=1\u00e9\nerrno=0\n\n".encode(), "not ASCII"),
    ],
)
def test_malformed_replies_raise_protocol_errors(operation: str, reply: bytes, message: str) -> None:
    with pytest.raises(UapiProtocolError, match=message):
        _read(operation, reply)


def test_eof_mid_reply_is_a_protocol_error() -> None:
    reader = ReplyReader("get")
    reader.receive_data(b"listen_port=1\n")
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    with pytest.raises(UapiProtocolError, match="connection closed after 14 bytes, mid-reply"):
        reader.next_event()
    with pytest.raises(RuntimeError):
        reader.receive_data(b"more")


def test_oversized_reply_is_refused_and_memory_is_bounded() -> None:
    reader = ReplyReader("get", max_reply_bytes=100)
    for _ in range(50):
        reader.receive_data(b"x=" + b"1" * 30 + b"\n")
    assert len(reader._buf) <= 100 + 33
    with pytest.raises(UapiProtocolError, match="longer than 100 bytes"):
        reader.next_event()


def test_endpoint_text_forms() -> None:
    assert Endpoint.parse("[2001:db8::1]:51820").text() == "[2001:db8::1]:51820"
    assert str(Endpoint.parse("192.0.2.1:1")) == "192.0.2.1:1"
    for bad in (
        "192.0.2.1",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "2001:db8::1:5",
        "[2001:db8::1:5",
        "host:1",
        ":5",
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - EndpointFormatError is a ValueError; message varies
            Endpoint.parse(bad)
