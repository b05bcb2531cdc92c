"""natlib.stun: byte-exact vectors built by hand, validation, and fuzzing of the parsers."""

from __future__ import annotations

import struct
import zlib

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from natlib import stun

TXID = bytes(range(1, 13))  # 01 02 .. 0c
COOKIE = bytes.fromhex("2112a442")


def _fingerprint(data_before: bytes, body_len: int) -> bytes:
    """FINGERPRINT value for ``data_before`` (header + attributes so far), whose header must claim
    ``body_len`` (the final length, including the 8-byte FINGERPRINT attribute)."""
    header = data_before[:2] + struct.pack("!H", body_len) + data_before[4:]
    return struct.pack("!I", zlib.crc32(header) ^ 0x5354554E)


def _message(msg_type: int, txid: bytes, attrs: bytes, *, fingerprint: bool = False) -> bytes:
    body_len = len(attrs) + (8 if fingerprint else 0)
    data = struct.pack("!HH", msg_type, body_len) + COOKIE + txid + attrs
    if fingerprint:
        data += b"\x80\x28\x00\x04" + _fingerprint(data, body_len)
    return data


# Binding Success Response, TxID 01..0c, 192.0.2.1:3478.
# port 3478 = 0x0d96 ^ 0x2112 = 0x2c84; 192.0.2.1 = c0000201 ^ 2112a442 = e112a643.
V4_RESPONSE = bytes.fromhex(
    "0101 000c 2112a442 0102030405060708090a0b0c"  # header
    "0020 0008 00 01 2c84 e112a643"  # XOR-MAPPED-ADDRESS, family 1
)
# Same TxID, [2001:db8::1]:3478. Address ^ (cookie ‖ TxID):
# 20010db8 00000000 00000000 00000001 ^ 2112a442 01020304 05060708 090a0b0c
V6_RESPONSE = bytes.fromhex(
    "0101 0018 2112a442 0102030405060708090a0b0c0020 0014 00 02 2c84 0113a9fa 01020304 05060708 090a0b0d"
)
# Tailscale's request with TxID 01..0c: SOFTWARE "tailnode", then FINGERPRINT.
TS_REQUEST_PREFIX = bytes.fromhex("0001 0014 2112a442 0102030405060708090a0b0c 8022 0008") + b"tailnode"
TS_REQUEST = TS_REQUEST_PREFIX + bytes.fromhex("8028 0004") + _fingerprint(TS_REQUEST_PREFIX, 0x14)

# RFC 5769 §2.1 sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY, FINGERPRINT).
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
# RFC 5769 §2.2 and §2.3 sample responses (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT).
RFC5769_V4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
RFC5769_V6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)


# -- requests ---------------------------------------------------------------------------------------


def test_tailscale_request_is_byte_exact() -> None:
    assert len(TS_REQUEST) == 40
    assert stun.tailscale_binding_request(TXID) == TS_REQUEST


def test_tailscale_request_random_txid() -> None:
    a, b = stun.tailscale_binding_request(), stun.tailscale_binding_request()
    assert len(a) == 40
    assert a[8:20] != b[8:20]
    assert stun.parse_binding_request(a).is_tailscale


def test_plain_request_is_byte_exact() -> None:
    assert stun.binding_request(TXID) == bytes.fromhex("0001 0000 2112a442 0102030405060708090a0b0c")
    assert stun.binding_request(TXID, fingerprint=True) == _message(0x0001, TXID, b"", fingerprint=True)


def test_request_rejects_bad_txid() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        stun.tailscale_binding_request(b"short")
    with pytest.raises(ValueError, match="12 bytes"):
        stun.binding_request(bytes(13))


def test_parse_tailscale_request() -> None:
    req = stun.parse_binding_request(TS_REQUEST)
    assert req == stun.BindingRequest(txid=TXID, software=b"tailnode", has_fingerprint=True)
    assert req.is_tailscale
    assert stun.binding_request_txid(TS_REQUEST) == TXID


@pytest.mark.parametrize("fingerprint", [False, True])
def test_parse_plain_request(fingerprint: bool) -> None:
    req = stun.parse_binding_request(stun.binding_request(TXID, fingerprint=fingerprint))
    assert req.txid == TXID
    assert req.software is None
    assert req.has_fingerprint is fingerprint
    assert not req.is_tailscale


def test_parse_request_accepts_memoryview_and_bytearray() -> None:
    buf = bytearray(TS_REQUEST + b"junk-after-the-datagram")
    assert stun.parse_binding_request(memoryview(buf)[: len(TS_REQUEST)]).txid == TXID
    assert stun.parse_binding_request(bytearray(TS_REQUEST)).txid == TXID


def test_parse_rfc5769_request() -> None:
    req = stun.parse_binding_request(RFC5769_REQUEST)
    assert req.txid == RFC5769_TXID
    assert req.software == b"STUN test client"
    assert req.has_fingerprint
    assert not req.is_tailscale


def test_tailscale_flavour_needs_fingerprint() -> None:
    no_fp = _message(0x0001, TXID, b"\x80\x22\x00\x08tailnode")
    req = stun.parse_binding_request(no_fp)
    assert req.software == b"tailnode"
    assert not req.is_tailscale


@pytest.mark.parametrize("offset", [10, 19, 24, 31, 36, 39])  # TxID, SOFTWARE, the CRC itself
def test_bad_fingerprint_is_rejected(offset: int) -> None:
    bad = bytearray(TS_REQUEST)
    bad[offset] ^= 0x01
    with pytest.raises(stun.FingerprintError, match="does not match"):
        stun.parse_binding_request(bytes(bad))
    assert stun.binding_request_txid(bytes(bad)) is None


def test_fingerprint_must_be_last() -> None:
    fp_first = _message(0x0001, TXID, b"", fingerprint=True)
    data = bytearray(fp_first + b"\x80\x22\x00\x04abcd")
    data[2:4] = struct.pack("!H", len(data) - 20)
    with pytest.raises(stun.FingerprintError, match="last"):
        stun.parse_binding_request(bytes(data))


def test_fingerprint_wrong_length() -> None:
    data = _message(0x0001, TXID, b"\x80\x28\x00\x08" + bytes(8))
    with pytest.raises(stun.FingerprintError, match="length"):
        stun.parse_binding_request(data)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", stun.NotStunError),
        (TS_REQUEST[:19], stun.NotStunError),  # shorter than a header
        (TS_REQUEST[:-4], stun.NotStunError),  # truncated: length no longer matches
        (TS_REQUEST + b"\x00\x00\x00\x00", stun.NotStunError),  # trailing bytes
        (b"\x40" + TS_REQUEST[1:], stun.NotStunError),  # top bits set
        (b"\x80" + TS_REQUEST[1:], stun.NotStunError),
        (TS_REQUEST[:4] + b"\x00\x00\x00\x00" + TS_REQUEST[8:], stun.NotStunError),  # RFC 3489: no cookie
        (bytes.fromhex("0001 0002 2112a442") + TXID + b"\x00\x00", stun.NotStunError),  # length % 4
        (_message(0x0011, TXID, b""), stun.UnexpectedMessageError),  # Binding Indication
        (V4_RESPONSE, stun.UnexpectedMessageError),
        (_message(0x0003, TXID, b""), stun.UnexpectedMessageError),  # Allocate
        (_message(0x0001, TXID, b"\x80\x22\x00\x09tailnode"), stun.MalformedStunError),  # padding missing
        (_message(0x0001, TXID, b"\x80\x22\x00\x0ctail"), stun.MalformedStunError),  # overruns
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", stun.NotStunError),
    ],
)
def test_parse_request_rejects(data: bytes, error: type[stun.StunParseError]) -> None:
    with pytest.raises(error):
        stun.parse_binding_request(data)
    assert stun.binding_request_txid(data) is None


def test_error_hierarchy() -> None:
    for cls in (
        stun.NotStunError,
        stun.MalformedStunError,
        stun.FingerprintError,
        stun.UnexpectedMessageError,
        stun.TransactionIdMismatchError,
    ):
        assert issubclass(cls, stun.StunParseError)
        assert issubclass(cls, ValueError)
        assert issubclass(cls, stun.StunError)
    assert issubclass(stun.StunTimeoutError, TimeoutError)
    assert issubclass(stun.StunTimeoutError, stun.StunError)


def test_every_truncation_of_a_request_is_rejected_cleanly() -> None:
    for n in range(len(TS_REQUEST)):
        with pytest.raises(stun.StunParseError):
            stun.parse_binding_request(TS_REQUEST[:n])


def test_unknown_attributes_are_ignored() -> None:
    # 0x0024 PRIORITY and an unknown comprehension-optional attribute, then FINGERPRINT.
    data = _message(
        0x0001, TXID, b"\x00\x24\x00\x04\x00\x00\x00\x01\xc0\x57\x00\x01z\x00\x00\x00", fingerprint=True
    )
    req = stun.parse_binding_request(data)
    assert req.txid == TXID
    assert req.has_fingerprint


# -- responses --------------------------------------------------------------------------------------


def test_ipv4_response_is_byte_exact() -> None:
    assert len(V4_RESPONSE) == 32
    assert stun.binding_response(TXID, ("192.0.2.1", 3478)) == V4_RESPONSE


def test_ipv6_response_is_byte_exact() -> None:
    assert len(V6_RESPONSE) == 44
    assert stun.binding_response(TXID, ("2001:db8::1", 3478)) == V6_RESPONSE


def test_v4_mapped_address_is_sent_as_ipv4() -> None:
    assert stun.binding_response(TXID, ("::ffff:192.0.2.1", 3478)) == V4_RESPONSE


def test_ipv6_scope_is_dropped() -> None:
    scoped = stun.binding_response(TXID, ("fe80::1%lo", 1))
    assert scoped == stun.binding_response(TXID, ("fe80::1", 1))
    assert len(scoped) == 44


def test_response_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="port"):
        stun.binding_response(TXID, ("192.0.2.1", 65536))
    with pytest.raises(ValueError, match="12 bytes"):
        stun.binding_response(b"x", ("192.0.2.1", 1))
    with pytest.raises(ValueError, match="does not appear to be"):
        stun.binding_response(TXID, ("example.com", 1))


def test_response_is_readable_by_aioice() -> None:
    msg = aioice_stun.parse_message(V6_RESPONSE)
    assert msg.transaction_id == TXID
    assert msg.attributes == {"XOR-MAPPED-ADDRESS": ("2001:db8::1", 3478)}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (V4_RESPONSE, ("192.0.2.1", 3478)),
        (V6_RESPONSE, ("2001:db8::1", 3478)),
    ],
)
def test_parse_own_vectors(data: bytes, expected: tuple[str, int]) -> None:
    assert stun.parse_binding_response(data, TXID) == expected
    assert stun.parse_binding_response(data) == expected


def test_parse_rfc5769_responses() -> None:
    assert stun.parse_binding_response(RFC5769_V4_RESPONSE, RFC5769_TXID) == ("192.0.2.1", 32853)
    assert stun.parse_binding_response(RFC5769_V6_RESPONSE, RFC5769_TXID) == (
        "2001:db8:1234:5678:11:2233:4455:6677",
        32853,
    )


def test_parse_response_checks_txid() -> None:
    with pytest.raises(stun.TransactionIdMismatchError):
        stun.parse_binding_response(V4_RESPONSE, bytes(12))


def test_parse_response_old_xor_mapped_address() -> None:
    attr = b"\x80\x20\x00\x08\x00\x01\x2c\x84\xe1\x12\xa6\x43"
    assert stun.parse_binding_response(_message(0x0101, TXID, attr), TXID) == ("192.0.2.1", 3478)


def test_parse_response_mapped_address() -> None:
    attr = b"\x00\x01\x00\x08\x00\x01\x0d\x96\xc0\x00\x02\x01"
    assert stun.parse_binding_response(_message(0x0101, TXID, attr), TXID) == ("192.0.2.1", 3478)


def test_parse_response_prefers_xor_mapped_address() -> None:
    mapped = b"\x00\x01\x00\x08\x00\x01\x00\x01\x0a\x00\x00\x01"  # 10.0.0.1:1
    old_xor = b"\x80\x20\x00\x08\x00\x01\x21\x10\x2b\x12\xa4\x43"  # 10.0.0.1:2 (XORed)
    xor = V4_RESPONSE[20:]
    assert stun.parse_binding_response(_message(0x0101, TXID, mapped + old_xor + xor)) == ("192.0.2.1", 3478)
    assert stun.parse_binding_response(_message(0x0101, TXID, mapped + old_xor)) == ("10.0.0.1", 2)


def test_parse_response_unmaps_v4_mapped() -> None:
    # MAPPED-ADDRESS, family 2, ::ffff:192.0.2.1 (what a dual-stack Go server may send).
    attr = b"\x00\x01\x00\x14\x00\x02\x0d\x96" + bytes(10) + b"\xff\xff\xc0\x00\x02\x01"
    assert stun.parse_binding_response(_message(0x0101, TXID, attr)) == ("192.0.2.1", 3478)


def test_parse_response_with_fingerprint() -> None:
    good = _message(0x0101, TXID, V4_RESPONSE[20:], fingerprint=True)
    assert stun.parse_binding_response(good, TXID) == ("192.0.2.1", 3478)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(stun.FingerprintError):
        stun.parse_binding_response(bad, TXID)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_message(0x0101, TXID, b""), stun.MalformedStunError),  # no address
        (_message(0x0101, TXID, b"\x00\x20\x00\x04\x00\x01\x00\x00"), stun.MalformedStunError),  # short
        (
            _message(0x0101, TXID, b"\x00\x20\x00\x08\x00\x03\x00\x00\x00\x00\x00\x00"),
            stun.MalformedStunError,
        ),
        (_message(0x0101, TXID, b"\x00\x20\x00\x14\x00\x02" + bytes(6)), stun.MalformedStunError),  # overrun
        (TS_REQUEST, stun.UnexpectedMessageError),
        (_message(0x0111, TXID, b"\x00\x09\x00\x04\x00\x00\x04\x00"), stun.UnexpectedMessageError),  # 400
        (V4_RESPONSE[:-1], stun.NotStunError),
        (b"\x00" * 3, stun.NotStunError),
    ],
)
def test_parse_response_rejects(data: bytes, error: type[stun.StunParseError]) -> None:
    with pytest.raises(error):
        stun.parse_binding_response(data, TXID)


def test_error_response_reports_code() -> None:
    with pytest.raises(stun.UnexpectedMessageError, match="error response 420"):
        stun.parse_binding_response(_message(0x0111, TXID, b"\x00\x09\x00\x04\x00\x00\x04\x14"))


# -- client transactions ----------------------------------------------------------------------------


def test_retransmit_schedule() -> None:
    assert stun.retransmit_schedule(10.0) == pytest.approx((10.0, 10.1, 10.2))
    assert stun.retransmit_schedule(0.0, (0.0, 0.5, 1.5)) == (0.0, 0.5, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        stun.retransmit_schedule(0.0, ())
    with pytest.raises(ValueError, match="non-decreasing"):
        stun.retransmit_schedule(0.0, (0.2, 0.1))


def _reply_to(request: bytes, addr: tuple[str, int]) -> bytes:
    return stun.binding_response(stun.parse_binding_request(request).txid, addr)


def test_transaction_sends_on_schedule_and_completes() -> None:
    tx = stun.BindingTransaction(now=100.0)
    assert tx.next_deadline() == 100.0
    first = tx.datagrams_to_send(100.0)
    assert len(first) == 1
    assert stun.parse_binding_request(first[0]).is_tailscale
    assert tx.datagrams_to_send(100.05) == []
    assert tx.next_deadline() == pytest.approx(100.1)
    second = tx.datagrams_to_send(100.1)
    assert len(second) == 1
    assert second[0][8:20] != first[0][8:20]  # a fresh TxID per probe
    assert tx.next_deadline() == pytest.approx(100.2)

    # Garbage, another transaction's reply and a request are all ignored.
    assert tx.receive_datagram(b"garbage", 100.12) is None
    assert tx.receive_datagram(stun.binding_response(bytes(12), ("192.0.2.9", 9)), 100.12) is None
    assert tx.receive_datagram(first[0], 100.12) is None
    assert tx.next_deadline() == pytest.approx(100.2)  # still waiting

    # The first probe is answered late: the RTT is measured from that probe's send.
    res = tx.receive_datagram(_reply_to(first[0], ("::ffff:198.51.100.7", 41641)), 100.15)
    assert res is not None
    assert res.addr == ("198.51.100.7", 41641)
    assert res.rtt == pytest.approx(0.15)
    assert res.txid == first[0][8:20]
    assert tx.done
    assert tx.result is res
    assert tx.next_deadline() is None
    assert tx.datagrams_to_send(100.2) == []
    assert tx.datagrams_to_send(1000.0) == []  # done: no timeout any more
    assert tx.receive_datagram(_reply_to(second[0], ("192.0.2.1", 1)), 100.16) is None


def test_transaction_times_out() -> None:
    tx = stun.BindingTransaction(now=0.0, timeout=1.0, tailscale=False)
    sent = tx.datagrams_to_send(0.5)  # a late caller gets every probe that is due
    assert len(sent) == 3
    assert len({d[8:20] for d in sent}) == 3
    assert all(not stun.parse_binding_request(d).is_tailscale for d in sent)
    assert tx.sent == 3
    assert tx.datagrams_to_send(0.9) == []
    assert tx.next_deadline() == 1.0
    with pytest.raises(stun.StunTimeoutError):
        tx.datagrams_to_send(1.0)


def test_transaction_deadline_caps_next_send() -> None:
    tx = stun.BindingTransaction(now=0.0, schedule=(0.0, 5.0), timeout=2.0)
    tx.datagrams_to_send(0.0)
    assert tx.next_deadline() == 2.0
    assert tx.send_times == (0.0, 5.0)
    with pytest.raises(ValueError, match="positive"):
        stun.BindingTransaction(now=0.0, timeout=0)


# -- fuzzing ----------------------------------------------------------------------------------------

header_like = st.builds(
    lambda t, txid, body: struct.pack("!HH", t, len(body)) + COOKIE + txid + body,
    st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011, 0x4001, 0x0003]) | st.integers(0, 0xFFFF),
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=80).map(lambda b: b + bytes(-len(b) % 4)),
)
tlv_like = st.builds(
    lambda attrs, fp: _message(0x0001, TXID, b"".join(attrs), fingerprint=fp),
    st.lists(
        st.builds(
            lambda t, v, claim: (
                struct.pack("!HH", t, claim if claim is not None else len(v)) + v + bytes(-len(v) % 4)
            ),
            st.sampled_from([0x0001, 0x0020, 0x8020, 0x8022, 0x8028, 0x0009, 0xC057]),
            st.binary(max_size=24),
            st.none() | st.integers(0, 0xFFFF),
        ),
        max_size=4,
    ),
    st.booleans(),
)
datagrams = st.binary(max_size=128) | header_like | tlv_like | st.just(TS_REQUEST) | st.just(V6_RESPONSE)


@settings(max_examples=400, deadline=None)
@given(datagrams)
def test_fuzz_request_parser_raises_only_stun_errors(data: bytes) -> None:
    try:
        req = stun.parse_binding_request(data)
    except stun.StunParseError:
        assert stun.binding_request_txid(data) is None
    else:
        assert req.txid == data[8:20]
        assert stun.binding_request_txid(data) == req.txid
        # Whatever we accept, we can answer, and our answer parses back.
        reply = stun.binding_response(req.txid, ("192.0.2.1", 3478))
        assert stun.parse_binding_response(reply, req.txid) == ("192.0.2.1", 3478)


@settings(max_examples=400, deadline=None)
@given(datagrams | st.builds(lambda a: _message(0x0101, TXID, a), st.binary(max_size=40)))
def test_fuzz_response_parser_raises_only_stun_errors(data: bytes) -> None:
    try:
        host, port = stun.parse_binding_response(data)
    except stun.StunParseError:
        pass
    else:
        assert isinstance(host, str)
        assert 0 <= port <= 0xFFFF
    tx = stun.BindingTransaction(now=0.0)
    tx.datagrams_to_send(0.0)
    assert tx.receive_datagram(data, 0.01) is None  # not one of our TxIDs (or not a response)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=12, max_size=12),
    st.ip_addresses(),
    st.integers(0, 0xFFFF),
)
def test_fuzz_response_round_trip(txid: bytes, ip: object, port: int) -> None:
    data = stun.binding_response(txid, (str(ip), port))
    assert len(data) == (32 if stun.canonical_ip(str(ip)).version == 4 else 44)
    assert stun.parse_binding_response(data, txid) == (str(stun.canonical_ip(str(ip))), port)
    assert aioice_stun.parse_message(data).transaction_id == txid
