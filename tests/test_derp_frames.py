"""natlib.derp frames: the spec's byte vectors, every frame's exact encoding, every length rule on
decoding, the incremental FrameDecoder, and property tests (fuzzing and encode/decode round trips).

Expected bytes are written out by hand from derp-protocol.md §1–§2 and §10, never produced by the
code under test.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natlib.derp import (
    CLIENT_MAX_FRAME_READ,
    FRAME_HEADER_LEN,
    KEY_LEN,
    MAGIC,
    MAX_PACKET_SIZE,
    NONCE_LEN,
    ClientInfoFrame,
    ClosePeer,
    DerpError,
    ForwardPacket,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Health,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    PeerPresentFlags,
    Ping,
    Pong,
    ProtocolError,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfoFrame,
    ServerKey,
    UnknownFrame,
    WatchConns,
    decode_frame,
    is_disco_packet,
    read_frame_header,
    write_frame_header,
)

K1 = bytes(range(1, 33))  # 01 02 .. 20
K2 = bytes(range(0x41, 0x61))  # 41 .. 60
NONCE = bytes(range(0xA0, 0xA0 + NONCE_LEN))
PING8 = bytes([1, 2, 3, 4, 5, 6, 7, 0x2A])
DISCO_MAGIC = bytes.fromhex("5453f09f92ac")  # "TS💬"


def hdr(t: int, n: int) -> bytes:
    """A frame header built by hand: type byte, then the length as 4 big-endian bytes."""
    return bytes([t, (n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF])


def reason_of(exc_info: pytest.ExceptionInfo[FrameError]) -> str:
    return exc_info.value.reason


# -- constants and headers (§1, §10) -------------------------------------------------------------


def test_magic_bytes() -> None:
    assert bytes([0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91]) == MAGIC
    assert "DERP🔑".encode() == MAGIC
    assert len(MAGIC) == 8


def test_constants() -> None:
    assert FRAME_HEADER_LEN == 5
    assert KEY_LEN == 32
    assert NONCE_LEN == 24
    assert MAX_PACKET_SIZE == 65536
    assert CLIENT_MAX_FRAME_READ == 1 << 20


def test_frame_type_codes() -> None:
    assert {t.name: t.value for t in FrameType} == {
        "SERVER_KEY": 0x01,
        "CLIENT_INFO": 0x02,
        "SERVER_INFO": 0x03,
        "SEND_PACKET": 0x04,
        "RECV_PACKET": 0x05,
        "KEEP_ALIVE": 0x06,
        "NOTE_PREFERRED": 0x07,
        "PEER_GONE": 0x08,
        "PEER_PRESENT": 0x09,
        "FORWARD_PACKET": 0x0A,
        "WATCH_CONNS": 0x10,
        "CLOSE_PEER": 0x11,
        "PING": 0x12,
        "PONG": 0x13,
        "HEALTH": 0x14,
        "RESTARTING": 0x15,
    }
    assert PeerGoneReason.DISCONNECTED == 0x00
    assert PeerGoneReason.NOT_HERE == 0x01
    assert PeerGoneReason.MESH_CONN_BROKE == 0xF0
    assert PeerPresentFlags.IS_REGULAR == 0x01
    assert PeerPresentFlags.IS_MESH_PEER == 0x02
    assert PeerPresentFlags.IS_PROBER == 0x04
    assert PeerPresentFlags.NOT_IDEAL == 0x08


@pytest.mark.parametrize(
    ("wire", "t", "n"),
    [
        (bytes([0x04, 0x00, 0x00, 0x04, 0x00]), FrameType.SEND_PACKET, 1024),
        (bytes([0x06, 0x00, 0x00, 0x00, 0x00]), FrameType.KEEP_ALIVE, 0),
        (bytes([0x05, 0xFF, 0xFF, 0xFF, 0xFF]), FrameType.RECV_PACKET, 0xFFFFFFFF),
        (bytes([0xFF, 0x01, 0x02, 0x03, 0x04]), 0xFF, 0x01020304),
    ],
)
def test_header_vectors(wire: bytes, t: int, n: int) -> None:
    assert write_frame_header(t, n) == wire
    assert read_frame_header(wire) == (t, n)
    assert read_frame_header(bytearray(wire)) == (t, n)
    assert read_frame_header(memoryview(b"xyz" + wire), 3) == (t, n)
    assert read_frame_header(wire + b"trailing") == (t, n)


@pytest.mark.parametrize("buf", [b"", b"\x04", b"\x04\x00\x00\x04"])
def test_short_header(buf: bytes) -> None:
    with pytest.raises(FrameError) as ei:
        read_frame_header(buf)
    assert reason_of(ei) == "short_header"
    with pytest.raises(FrameError):
        read_frame_header(b"\x04\x00\x00\x04\x00", 1)


@pytest.mark.parametrize(("t", "n"), [(-1, 0), (256, 0), (4, -1), (4, 1 << 32)])
def test_header_out_of_range(t: int, n: int) -> None:
    with pytest.raises(struct.error):
        write_frame_header(t, n)


def test_error_hierarchy() -> None:
    assert issubclass(FrameError, ProtocolError)
    assert issubclass(ProtocolError, DerpError)
    e = FrameError("some_reason", "text")
    assert e.reason == "some_reason"
    assert str(e) == "text"


# -- exact encodings (§2) ------------------------------------------------------------------------

ENCODINGS: list[tuple[Frame, bytes]] = [
    (ServerKey(K1), hdr(0x01, 40) + MAGIC + K1),
    (ClientInfoFrame(K1, NONCE + b"box"), hdr(0x02, 59) + K1 + NONCE + b"box"),
    (ServerInfoFrame(NONCE + b"sealed"), hdr(0x03, 30) + NONCE + b"sealed"),
    (SendPacket(K2, b"hello"), hdr(0x04, 37) + K2 + b"hello"),
    (SendPacket(K2, b""), hdr(0x04, 32) + K2),
    (RecvPacket(K1, b"hi"), hdr(0x05, 34) + K1 + b"hi"),
    (KeepAlive(), bytes([0x06, 0, 0, 0, 0])),
    (NotePreferred(True), bytes([0x07, 0, 0, 0, 1, 0x01])),
    (NotePreferred(False), bytes([0x07, 0, 0, 0, 1, 0x00])),
    (PeerGone(K1), hdr(0x08, 33) + K1 + b"\x00"),
    (PeerGone(K1, PeerGoneReason.NOT_HERE), hdr(0x08, 33) + K1 + b"\x01"),
    (
        PeerPresent(K1, ipaddress.ip_address("1.2.3.4"), 41641, PeerPresentFlags.IS_REGULAR),
        hdr(0x09, 51) + K1 + bytes(10) + b"\xff\xff" + bytes([1, 2, 3, 4]) + b"\xa2\xa9" + b"\x01",
    ),
    (
        PeerPresent(K1, ipaddress.ip_address("2001:db8::1"), 1, PeerPresentFlags.IS_MESH_PEER),
        hdr(0x09, 51) + K1 + bytes.fromhex("20010db8000000000000000000000001") + b"\x00\x01\x02",
    ),
    (ForwardPacket(K1, K2, b"pkt"), hdr(0x0A, 67) + K1 + K2 + b"pkt"),
    (WatchConns(), bytes([0x10, 0, 0, 0, 0])),
    (ClosePeer(K2), hdr(0x11, 32) + K2),
    (Ping(PING8), bytes([0x12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 0x2A])),
    (Pong(PING8), bytes([0x13, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 0x2A])),
    (Health("BAD"), bytes([0x14, 0, 0, 0, 3]) + b"BAD"),
    (Health(""), bytes([0x14, 0, 0, 0, 0])),
    (Health("é"), bytes([0x14, 0, 0, 0, 2, 0xC3, 0xA9])),
    (Restarting(1, 2), bytes([0x15, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 2])),
    (Restarting(0xFFFFFFFF, 0x01020304), bytes([0x15, 0, 0, 0, 8]) + b"\xff" * 4 + b"\x01\x02\x03\x04"),
    (UnknownFrame(0x0B, b"xyz"), bytes([0x0B, 0, 0, 0, 3]) + b"xyz"),
    (UnknownFrame(0xFF, b""), bytes([0xFF, 0, 0, 0, 0])),
]


@pytest.mark.parametrize(("frame", "wire"), ENCODINGS, ids=[type(f).__name__ for f, _ in ENCODINGS])
def test_encoding(frame: Frame, wire: bytes) -> None:
    assert frame.encode() == wire
    assert frame.payload() == wire[FRAME_HEADER_LEN:]
    t, n = read_frame_header(wire)
    assert n == len(wire) - FRAME_HEADER_LEN
    if not isinstance(frame, UnknownFrame):
        assert t == frame.TYPE
    assert decode_frame(t, wire[FRAME_HEADER_LEN:]) == frame


def test_every_frame_type_has_an_encoding_vector() -> None:
    covered = {type(f).TYPE for f, _ in ENCODINGS if not isinstance(f, UnknownFrame)}
    assert covered == set(FrameType)


def test_peer_present_without_ip_encodes_the_zero_address() -> None:
    # The relay builds PeerPresent(key, None, 0, flags) when it does not know the address.
    assert PeerPresent(K1, flags=1).encode() == hdr(0x09, 51) + K1 + bytes(16) + b"\x00\x00\x01"


def test_peer_present_ipv6_is_not_unmapped_on_encode() -> None:
    # A v4-mapped IPv6Address goes out as the same 16 bytes as the IPv4Address.
    a = PeerPresent(K1, ipaddress.ip_address("::ffff:10.0.0.1"), 7).payload()
    b = PeerPresent(K1, ipaddress.ip_address("10.0.0.1"), 7).payload()
    assert a == b


@pytest.mark.parametrize(
    "make",
    [
        lambda: ServerKey(K1[:31]),
        lambda: ClientInfoFrame(K1 + b"\x00", NONCE),
        lambda: SendPacket(K1[:31], b""),
        lambda: SendPacket(K1, bytes(MAX_PACKET_SIZE + 1)),
        lambda: RecvPacket(b"", b"x"),
        lambda: PeerGone(K1 + K1),
        lambda: PeerPresent(K1[:16]),
        lambda: ForwardPacket(K1, K2[:31], b""),
        lambda: ClosePeer(b""),
        lambda: Ping(PING8[:7]),
        lambda: Ping(PING8 + b"\x00"),
        lambda: Pong(b""),
    ],
)
def test_encode_rejects_bad_fields(make: object) -> None:
    with pytest.raises(ValueError, match="bytes"):
        make().encode()  # type: ignore[operator]


def test_send_packet_max_size_encodes() -> None:
    wire = SendPacket(K1, bytes(MAX_PACKET_SIZE)).encode()
    assert wire[:5] == hdr(0x04, 32 + 65536)
    assert len(wire) == 5 + 32 + 65536


# -- decoding: length rules ----------------------------------------------------------------------


def _fails(t: int, payload: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as ei:
        decode_frame(t, payload)
    assert reason_of(ei) == reason


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert decode_frame(0x04, bytearray(K1 + b"x")) == SendPacket(K1, b"x")
    assert decode_frame(0x04, memoryview(K1 + b"x")) == SendPacket(K1, b"x")
    f = decode_frame(0x04, memoryview(K1 + b"x"))
    assert isinstance(f, SendPacket)
    assert type(f.dst) is bytes
    assert type(f.packet) is bytes


def test_server_key() -> None:
    assert decode_frame(0x01, MAGIC + K1) == ServerKey(K1)
    # Clients ignore future bytes after the key.
    assert decode_frame(0x01, MAGIC + K1 + b"future") == ServerKey(K1)
    _fails(0x01, MAGIC + K1[:31], "bad_server_key")
    _fails(0x01, b"", "bad_server_key")
    _fails(0x01, b"DERP\xf0\x9f\x94\x90" + K1, "bad_server_key")
    _fails(0x01, K1 + MAGIC, "bad_server_key")


def test_client_info() -> None:
    assert decode_frame(0x02, K1 + NONCE) == ClientInfoFrame(K1, NONCE)
    assert decode_frame(0x02, K1 + NONCE + b"box") == ClientInfoFrame(K1, NONCE + b"box")
    _fails(0x02, K1 + NONCE[:-1], "short_client_info")
    _fails(0x02, b"", "short_client_info")


def test_server_info() -> None:
    assert decode_frame(0x03, NONCE) == ServerInfoFrame(NONCE)
    assert decode_frame(0x03, NONCE + b"box") == ServerInfoFrame(NONCE + b"box")
    _fails(0x03, NONCE[:-1], "short_server_info")


def test_send_packet_lengths() -> None:
    assert decode_frame(0x04, K1) == SendPacket(K1, b"")
    big = bytes(range(256)) * 256
    assert len(big) == MAX_PACKET_SIZE
    assert decode_frame(0x04, K1 + big) == SendPacket(K1, big)
    _fails(0x04, K1[:31], "short_send_packet")
    _fails(0x04, b"", "short_send_packet")
    _fails(0x04, K1 + big + b"\x00", "packet_too_large")


def test_recv_packet_lengths() -> None:
    assert decode_frame(0x05, K1) == RecvPacket(K1, b"")
    assert decode_frame(0x05, K1 + b"data") == RecvPacket(K1, b"data")
    _fails(0x05, K1[:31], "short_recv_packet")


def test_forward_packet_lengths() -> None:
    assert decode_frame(0x0A, K1 + K2) == ForwardPacket(K1, K2, b"")
    big = bytes(MAX_PACKET_SIZE)
    assert decode_frame(0x0A, K1 + K2 + big) == ForwardPacket(K1, K2, big)
    _fails(0x0A, K1 + K2[:31], "short_forward_packet")
    _fails(0x0A, K1 + K2 + big + b"\x00", "packet_too_large")


@pytest.mark.parametrize("payload", [b"", b"\x00", b"anything"])
def test_keep_alive(payload: bytes) -> None:
    assert decode_frame(0x06, payload) == KeepAlive()


def test_note_preferred() -> None:
    assert decode_frame(0x07, b"\x01") == NotePreferred(True)
    assert decode_frame(0x07, b"\x00") == NotePreferred(False)
    assert decode_frame(0x07, b"\x02") == NotePreferred(True)  # any non-zero byte
    _fails(0x07, b"", "bad_note_preferred_len")
    _fails(0x07, b"\x01\x00", "bad_note_preferred_len")


def test_peer_gone() -> None:
    # Without the reason byte (old servers): Disconnected.
    f = decode_frame(0x08, K1)
    assert f == PeerGone(K1, PeerGoneReason.DISCONNECTED)
    assert isinstance(f, PeerGone)
    assert f.reason == PeerGoneReason.DISCONNECTED
    assert decode_frame(0x08, K1 + b"\x01") == PeerGone(K1, PeerGoneReason.NOT_HERE)
    assert decode_frame(0x08, K1 + b"\x00") == PeerGone(K1, PeerGoneReason.DISCONNECTED)
    assert decode_frame(0x08, K1 + b"\x01extra") == PeerGone(K1, PeerGoneReason.NOT_HERE)
    # Unknown reason values are passed through.
    f = decode_frame(0x08, K1 + b"\x7f")
    assert isinstance(f, PeerGone)
    assert f.reason == 0x7F
    _fails(0x08, K1[:31], "short_peer_gone")


def test_peer_present_old_server_key_only() -> None:
    assert decode_frame(0x09, K1) == PeerPresent(K1, None, 0, 0)
    # Between 33 and 49 bytes the IP/port part is incomplete: treated like an old server (Go does).
    assert decode_frame(0x09, K1 + bytes(17)) == PeerPresent(K1, None, 0, 0)
    _fails(0x09, K1[:31], "short_peer_present")


def test_peer_present_without_flags() -> None:
    ip4 = bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])
    f = decode_frame(0x09, K1 + ip4 + b"\x01\xbb")
    assert f == PeerPresent(K1, ipaddress.IPv4Address("192.168.1.2"), 443, 0)


def test_peer_present_full_and_longer() -> None:
    ip4 = bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])
    f = decode_frame(0x09, K1 + ip4 + b"\x01\xbb\x05")
    assert isinstance(f, PeerPresent)
    # IPv4 arrives v4-mapped in 16 bytes and comes out as an IPv4Address.
    assert f.ip == ipaddress.IPv4Address("192.168.1.2")
    assert isinstance(f.ip, ipaddress.IPv4Address)
    assert f.port == 443
    assert f.flags == PeerPresentFlags.IS_REGULAR | PeerPresentFlags.IS_PROBER
    assert decode_frame(0x09, K1 + ip4 + b"\x01\xbb\x05" + b"future") == f
    ip6 = bytes.fromhex("fe800000000000000000000000000001")
    f6 = decode_frame(0x09, K1 + ip6 + b"\xff\xff\x02")
    assert f6 == PeerPresent(K1, ipaddress.IPv6Address("fe80::1"), 65535, PeerPresentFlags.IS_MESH_PEER)
    # The all-zero address stays IPv6 ("::"): it is not v4-mapped.
    assert decode_frame(0x09, K1 + bytes(19)) == PeerPresent(K1, ipaddress.IPv6Address("::"), 0, 0)


def test_watch_conns() -> None:
    assert decode_frame(0x10, b"") == WatchConns()
    _fails(0x10, b"\x00", "bad_watch_conns_len")
    _fails(0x10, b"xyz", "bad_watch_conns_len")


@pytest.mark.parametrize("n", [0, 1, 31, 33, 64])
def test_close_peer_bad_lengths(n: int) -> None:
    _fails(0x11, bytes(n), "bad_close_peer_len")


def test_close_peer() -> None:
    assert decode_frame(0x11, K2) == ClosePeer(K2)


@pytest.mark.parametrize("n", [8, 9, 100, 999, 1000])
def test_ping_accepted_lengths_keep_first_8(n: int) -> None:
    payload = PING8 + bytes(range(n - 8))[: n - 8] if n - 8 <= 256 else PING8 + b"\xee" * (n - 8)
    assert len(payload) == n
    assert decode_frame(0x12, payload) == Ping(PING8)


@pytest.mark.parametrize("n", [0, 1, 7, 1001, 4096])
def test_ping_bad_lengths(n: int) -> None:
    _fails(0x12, b"\x01" * n, "bad_ping_len")


def test_pong() -> None:
    assert decode_frame(0x13, PING8) == Pong(PING8)
    assert decode_frame(0x13, PING8 + b"extra") == Pong(PING8)
    _fails(0x13, PING8[:7], "bad_pong_len")
    _fails(0x13, b"", "bad_pong_len")


def test_health() -> None:
    assert decode_frame(0x14, b"BAD") == Health("BAD")
    assert decode_frame(0x14, b"") == Health("")
    assert decode_frame(0x14, "duplicate key ⚠".encode()) == Health("duplicate key ⚠")
    # Invalid UTF-8 is not fatal.
    f = decode_frame(0x14, b"\xff\xfeok")
    assert isinstance(f, Health)
    assert f.problem.endswith("ok")


def test_restarting() -> None:
    f = decode_frame(0x15, bytes([0, 0, 0, 1, 0, 0, 0, 2]))
    assert f == Restarting(1, 2)
    assert isinstance(f, Restarting)
    assert (f.reconnect_in_ms, f.try_for_ms) == (1, 2)
    assert decode_frame(0x15, bytes([0, 0, 0, 1, 0, 0, 0, 2, 9])) == Restarting(1, 2)
    _fails(0x15, bytes(7), "short_restarting")
    _fails(0x15, b"", "short_restarting")


@pytest.mark.parametrize("t", [0x00, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x16, 0x7F, 0xFF])
@pytest.mark.parametrize("payload", [b"", b"\x00" * 5, b"arbitrary"])
def test_unknown_types(t: int, payload: bytes) -> None:
    f = decode_frame(t, payload)
    assert f == UnknownFrame(t, payload)
    assert f.encode() == hdr(t, len(payload)) + payload


# -- is_disco_packet -----------------------------------------------------------------------------


def test_is_disco_packet_boundary() -> None:
    p62 = DISCO_MAGIC + bytes(56)
    assert len(p62) == 62
    assert is_disco_packet(p62)
    assert is_disco_packet(bytearray(p62))
    assert is_disco_packet(memoryview(p62))
    assert is_disco_packet(p62 + bytes(100))
    assert not is_disco_packet(p62[:61])
    assert not is_disco_packet(DISCO_MAGIC)
    assert not is_disco_packet(b"")
    assert not is_disco_packet(b"TS\xf0\x9f\x92\xad" + bytes(56))
    assert not is_disco_packet(bytes(62))
    assert "TS💬".encode() == DISCO_MAGIC


# -- FrameDecoder --------------------------------------------------------------------------------

STREAM_FRAMES: list[Frame] = [
    ServerKey(K1),
    ServerInfoFrame(NONCE + b"sealed!"),
    KeepAlive(),
    RecvPacket(K2, b"payload"),
    Ping(PING8),
    Health(""),
    UnknownFrame(0x0C, b"q"),
    PeerPresent(K1, ipaddress.ip_address("1.2.3.4"), 5, 1),
    WatchConns(),
]
STREAM = b"".join(f.encode() for f in STREAM_FRAMES)


def _drain(dec: FrameDecoder) -> list[tuple[int, bytes]]:
    out = []
    while (item := dec.next_frame()) is not None:
        out.append(item)
    return out


def _expected_pairs() -> list[tuple[int, bytes]]:
    out = []
    for f in STREAM_FRAMES:
        w = f.encode()
        out.append((w[0], w[5:]))
    return out


def test_decoder_whole_stream() -> None:
    dec = FrameDecoder()
    dec.feed(STREAM)
    pairs = _drain(dec)
    assert pairs == _expected_pairs()
    assert [decode_frame(t, p) for t, p in pairs] == STREAM_FRAMES
    assert dec.buffered == 0
    assert dec.next_frame() is None


def test_decoder_one_byte_at_a_time() -> None:
    dec = FrameDecoder()
    got = []
    for i in range(len(STREAM)):
        dec.feed(STREAM[i : i + 1])
        got += _drain(dec)
    assert got == _expected_pairs()
    assert dec.buffered == 0


def test_decoder_every_split_point() -> None:
    expected = _expected_pairs()
    for i in range(len(STREAM) + 1):
        dec = FrameDecoder()
        dec.feed(STREAM[:i])
        got = _drain(dec)
        dec.feed(memoryview(STREAM)[i:])
        got += _drain(dec)
        assert got == expected, i


def test_decoder_every_pair_of_split_points_in_one_frame() -> None:
    wire = RecvPacket(K1, b"abc").encode()
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1):
            dec = FrameDecoder()
            got = []
            for chunk in (wire[:i], wire[i:j], wire[j:]):
                dec.feed(chunk)
                got += _drain(dec)
            assert got == [(0x05, K1 + b"abc")], (i, j)


def test_decoder_partial_state() -> None:
    dec = FrameDecoder()
    dec.feed(hdr(0x05, 40)[:3])
    assert dec.next_frame() is None
    assert dec.buffered == 3
    dec.feed(hdr(0x05, 40)[3:] + K1)
    assert dec.next_frame() is None
    assert dec.buffered == 37
    dec.feed(b"12345678" + b"next")
    assert dec.next_frame() == (0x05, K1 + b"12345678")
    assert dec.buffered == 4
    assert dec.next_frame() is None
    assert dec.take_buffered() == b"next"
    assert dec.buffered == 0
    assert dec.next_frame() is None


def test_decoder_empty_feed() -> None:
    dec = FrameDecoder()
    dec.feed(b"")
    assert dec.next_frame() is None
    dec.feed(KeepAlive().encode())
    dec.feed(b"")
    assert dec.next_frame() == (0x06, b"")


def test_decoder_frame_too_large_raised_before_payload() -> None:
    dec = FrameDecoder(max_frame_len=100)
    # Exactly the limit is fine.
    dec.feed(hdr(0x05, 100) + bytes(100))
    assert dec.next_frame() == (0x05, bytes(100))
    # One more: rejected as soon as the header is complete, with no payload buffered.
    dec.feed(hdr(0x05, 101))
    assert dec.buffered == 5
    with pytest.raises(FrameError) as ei:
        dec.next_frame()
    assert reason_of(ei) == "frame_too_large"


def test_decoder_default_limit_is_client_read_limit() -> None:
    dec = FrameDecoder()
    assert dec.max_frame_len == 1 << 20
    dec.feed(hdr(0x05, (1 << 20) + 1))
    with pytest.raises(FrameError) as ei:
        dec.next_frame()
    assert reason_of(ei) == "frame_too_large"
    dec = FrameDecoder()
    dec.feed(hdr(0xFF, 0xFFFFFFFF))
    with pytest.raises(FrameError) as ei:
        dec.next_frame()
    assert reason_of(ei) == "frame_too_large"


def test_decoder_limit_applies_to_unknown_types() -> None:
    dec = FrameDecoder(max_frame_len=10)
    dec.feed(hdr(0x0B, 11))
    with pytest.raises(FrameError):
        dec.next_frame()


# -- property tests ------------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
small = st.binary(max_size=200)
u32 = st.integers(0, 0xFFFFFFFF)
ip4 = st.ip_addresses(v=4)
ip6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)  # mapped ones come back as v4
unknown_types = st.integers(0, 255).filter(lambda t: t not in set(FrameType))

frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(ServerKey, keys),
    st.builds(ClientInfoFrame, keys, st.binary(min_size=NONCE_LEN, max_size=200)),
    st.builds(ServerInfoFrame, st.binary(min_size=NONCE_LEN, max_size=200)),
    st.builds(SendPacket, keys, small),
    st.builds(RecvPacket, keys, small),
    st.just(KeepAlive()),
    st.builds(NotePreferred, st.booleans()),
    st.builds(PeerGone, keys, st.integers(0, 255)),
    st.builds(PeerPresent, keys, st.one_of(ip4, ip6), st.integers(0, 65535), st.integers(0, 255)),
    st.builds(ForwardPacket, keys, keys, small),
    st.just(WatchConns()),
    st.builds(ClosePeer, keys),
    st.builds(Ping, st.binary(min_size=8, max_size=8)),
    st.builds(Pong, st.binary(min_size=8, max_size=8)),
    st.builds(Health, st.text(max_size=50)),
    st.builds(Restarting, u32, u32),
    st.builds(UnknownFrame, unknown_types, small),
)


@settings(max_examples=500, deadline=None)
@given(frames)
def test_round_trip(frame: Frame) -> None:
    wire = frame.encode()
    t, n = read_frame_header(wire)
    assert n == len(wire) - FRAME_HEADER_LEN
    assert decode_frame(t, wire[FRAME_HEADER_LEN:]) == frame


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, max_size=8), st.data())
def test_round_trip_through_decoder_in_random_chunks(fs: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(f.encode() for f in fs)
    dec = FrameDecoder()
    got: list[Frame] = []
    pos = 0
    while pos < len(stream):
        size = data.draw(st.integers(1, max(1, len(stream) - pos)), label="chunk")
        dec.feed(stream[pos : pos + size])
        pos += size
        got += [decode_frame(t, p) for t, p in _drain(dec)]
    assert got == fs
    assert dec.buffered == 0


def _fuzz(stream: bytes, cuts: list[int], max_frame_len: int) -> None:
    """Feed ``stream`` cut at ``cuts``; anything other than FrameError propagates and fails."""
    dec = FrameDecoder(max_frame_len)
    pos = 0
    reasons: list[str] = []
    decoder_error: FrameError | None = None
    try:
        for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
            if cut < pos:
                continue
            dec.feed(stream[pos:cut])
            pos = cut
            while (item := dec.next_frame()) is not None:
                t, payload = item
                assert len(payload) <= max_frame_len
                try:
                    f = decode_frame(t, payload)
                except FrameError as e:
                    reasons.append(e.reason)
                else:
                    assert isinstance(f, Frame)
    except FrameError as e:
        decoder_error = e
    assert all(isinstance(r, str) and r for r in reasons)
    if decoder_error is not None:
        assert decoder_error.reason == "frame_too_large"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10), st.sampled_from([64, 1 << 20]))
def test_fuzz_random_bytes_only_raise_frame_error(stream: bytes, cuts: list[int], limit: int) -> None:
    _fuzz(stream, cuts, limit)


# Random frames with plausible headers, so that decode_frame sees every type with every length.
raw_frames = st.tuples(
    st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255)),
    st.binary(max_size=120),
).map(lambda tp: bytes([tp[0]]) + len(tp[1]).to_bytes(4, "big") + tp[1])


@settings(max_examples=500, deadline=None)
@given(st.lists(raw_frames, max_size=6), st.binary(max_size=10), st.lists(st.integers(0, 800), max_size=10))
def test_fuzz_well_framed_random_payloads_only_raise_frame_error(
    parts: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    _fuzz(b"".join(parts) + tail, cuts, 1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=1100))
def test_decode_frame_only_raises_frame_error(t: int, payload: bytes) -> None:
    try:
        f = decode_frame(t, payload)
    except FrameError:
        return
    assert isinstance(f, Frame)
