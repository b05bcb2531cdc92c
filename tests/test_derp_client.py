"""natlib.derp ClientConnection: the sans-io client state machine, driven with bytes against a
hand-rolled server side built from the handshake functions (spec §2, §3, §10 client_test.go)."""

from __future__ import annotations

import pytest

from natlib.derp import (
    CLIENT_MAX_FRAME_READ,
    MAGIC,
    MAX_PACKET_SIZE,
    NEED_DATA,
    SERVER_KEY_MAX_LEN,
    ClientConnection,
    ClientInfo,
    ClientState,
    Connected,
    FrameError,
    FrameType,
    HandshakeError,
    Health,
    KeepAlive,
    PeerGone,
    PeerGoneReason,
    Ping,
    Pong,
    ProtocolError,
    RecvPacket,
    Restarting,
    ServerInfo,
    TokenBucket,
    UnknownFrame,
    open_client_info,
    seal_server_info,
)
from natlib.keys import NodePrivateKey, NodePublicKey

K1 = bytes(range(1, 33))
PING8 = bytes([1, 2, 3, 4, 5, 6, 7, 0x2A])


def hdr(t: int, n: int) -> bytes:
    return bytes([t]) + n.to_bytes(4, "big")


def frame(t: int, payload: bytes = b"") -> bytes:
    return hdr(t, len(payload)) + payload


class FakeServer:
    """The server half of the handshake, producing and consuming bytes only."""

    def __init__(self) -> None:
        self.key = NodePrivateKey.generate()
        self.client_key: NodePublicKey | None = None
        self.client_info: ClientInfo | None = None

    def server_key(self, extra: bytes = b"") -> bytes:
        return frame(0x01, MAGIC + self.key.public.raw + extra)

    def accept_client_info(self, wire: bytes) -> bytes:
        """Parse exactly one ClientInfo frame from ``wire``; return the remaining bytes."""
        assert wire[0] == 0x02
        n = int.from_bytes(wire[1:5], "big")
        assert len(wire) >= 5 + n
        self.client_key, self.client_info = open_client_info(self.key, wire[5 : 5 + n])
        return wire[5 + n :]

    def server_info(self, info: ServerInfo | None = None, client_pub: bytes | None = None) -> bytes:
        pub = client_pub if client_pub is not None else self.client_key
        assert pub is not None
        raw = pub.raw if isinstance(pub, NodePublicKey) else pub
        return frame(0x03, seal_server_info(self.key, raw, info or ServerInfo()))


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def priv() -> NodePrivateKey:
    return NodePrivateKey.generate()


def events(conn: ClientConnection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def connect(
    server: FakeServer,
    priv: NodePrivateKey,
    server_info: ServerInfo | None = None,
    info: ClientInfo | None = None,
) -> ClientConnection:
    conn = ClientConnection(priv, info)
    conn.receive_data(server.server_key())
    assert events(conn) == []
    assert server.accept_client_info(conn.data_to_send()) == b""
    conn.receive_data(server.server_info(server_info))
    [ev] = events(conn)
    assert isinstance(ev, Connected)
    assert conn.state is ClientState.CONNECTED
    return conn


# -- handshake -----------------------------------------------------------------------------------


def test_normal_flow(server: FakeServer, priv: NodePrivateKey) -> None:
    info = ClientInfo(app_name="test", is_prober=True)
    conn = ClientConnection(priv, info)
    assert conn.state is ClientState.AWAIT_SERVER_KEY
    assert conn.data_to_send() == b""
    assert conn.next_event() is NEED_DATA

    conn.receive_data(server.server_key())
    assert conn.next_event() is NEED_DATA
    assert conn.state is ClientState.AWAIT_SERVER_INFO
    assert conn.server_key == server.key.public

    out = conn.data_to_send()
    assert out[0] == FrameType.CLIENT_INFO
    assert int.from_bytes(out[1:5], "big") == len(out) - 5
    assert out[5:37] == priv.public.raw
    assert server.accept_client_info(out) == b""
    assert server.client_key == priv.public
    assert server.client_info == info
    assert conn.data_to_send() == b""  # drained

    conn.receive_data(server.server_info() + frame(0x06))
    ev = conn.next_event()
    assert ev == Connected(server.key.public, ServerInfo(2))
    assert isinstance(ev, Connected)
    assert ev.server_key == server.key.public
    assert ev.server_info.version == 2
    assert conn.state is ClientState.CONNECTED
    assert conn.server_info == ServerInfo(2)
    # The first event after Connected is whatever frame followed ServerInfo.
    assert conn.next_event() == KeepAlive()
    assert conn.next_event() is NEED_DATA

    conn.receive_data(frame(0x05, K1 + b"hello"))
    assert events(conn) == [RecvPacket(K1, b"hello")]
    assert conn.data_to_send() == b""


def test_default_client_info(server: FakeServer, priv: NodePrivateKey) -> None:
    connect(server, priv)
    assert server.client_info == ClientInfo(None, 2, True, False, "")


def test_first_event_after_connect_is_next_frame(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(server.server_key())
    assert conn.next_event() is NEED_DATA
    server.accept_client_info(conn.data_to_send())
    conn.receive_data(server.server_info() + frame(0x05, K1 + b"x") + frame(0x08, K1 + b"\x01"))
    evs = events(conn)
    assert isinstance(evs[0], Connected)
    assert evs[1:] == [RecvPacket(K1, b"x"), PeerGone(K1, PeerGoneReason.NOT_HERE)]


def test_whole_server_side_one_byte_at_a_time(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv)
    wire = server.server_key(b"future") + server.server_info(client_pub=priv.public.raw) + frame(0x06)
    got: list[object] = []
    for i in range(len(wire)):
        conn.receive_data(wire[i : i + 1])
        got += events(conn)
    assert got == [Connected(server.key.public, ServerInfo()), KeepAlive()]
    assert server.accept_client_info(conn.data_to_send()) == b""
    assert server.client_key == priv.public


def test_server_key_with_future_bytes(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(server.server_key(b"\x00" * (SERVER_KEY_MAX_LEN - 40)))  # exactly 1 KiB
    assert events(conn) == []
    assert conn.server_key == server.key.public


def test_server_key_over_1k_rejected(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(server.server_key(b"\x00" * (SERVER_KEY_MAX_LEN - 40 + 1)))
    with pytest.raises(HandshakeError) as ei:
        conn.next_event()
    assert ei.value.reason == "server_key_too_large"
    assert conn.state is ClientState.CLOSED
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    "payload",
    [b"", MAGIC, MAGIC + bytes(31), b"DERP\xf0\x9f\x94\x90" + bytes(32), bytes(40)],
)
def test_bad_server_key_frame(priv: NodePrivateKey, payload: bytes) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(frame(0x01, payload))
    with pytest.raises(ProtocolError) as ei:
        conn.next_event()
    assert ei.value.reason == "bad_server_key"
    assert conn.state is ClientState.CLOSED


def test_low_order_server_key_is_a_handshake_error(priv: NodePrivateKey) -> None:
    """A zero key cannot be used for crypto_box: a HandshakeError, not a libsodium exception."""
    conn = ClientConnection(priv)
    conn.receive_data(frame(0x01, MAGIC + bytes(32)))
    with pytest.raises(HandshakeError):
        conn.next_event()
    assert conn.state is ClientState.CLOSED


@pytest.mark.parametrize(
    "first",
    [frame(0x06), frame(0x05, K1 + b"x"), frame(0x03, bytes(40)), frame(0x12, PING8), frame(0x0B, b"?")],
)
def test_first_frame_must_be_server_key(priv: NodePrivateKey, first: bytes) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(first)
    with pytest.raises(HandshakeError) as ei:
        conn.next_event()
    assert ei.value.reason == "expected_server_key"
    assert conn.state is ClientState.CLOSED
    assert conn.data_to_send() == b""  # no Pong, no ClientInfo


@pytest.mark.parametrize(
    "early",
    [frame(0x06), frame(0x05, K1 + b"x"), frame(0x08, K1), frame(0x12, PING8), frame(0x0B, b"?")],
)
def test_nothing_but_server_info_after_server_key(
    server: FakeServer, priv: NodePrivateKey, early: bytes
) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(server.server_key())
    assert events(conn) == []
    server.accept_client_info(conn.data_to_send())
    conn.receive_data(early + server.server_info())
    with pytest.raises(HandshakeError) as ei:
        conn.next_event()
    assert ei.value.reason == "expected_server_info"
    assert conn.state is ClientState.CLOSED
    assert conn.data_to_send() == b""  # a Ping before ServerInfo gets no Pong


def test_server_info_sealed_with_wrong_key(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(server.server_key())
    events(conn)
    impostor = FakeServer()
    conn.receive_data(impostor.server_info(client_pub=priv.public.raw))
    with pytest.raises(HandshakeError) as ei:
        conn.next_event()
    assert ei.value.reason == "bad_server_info_box"
    assert conn.state is ClientState.CLOSED


def test_server_info_too_short(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(server.server_key() + frame(0x03, bytes(23)))
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.state is ClientState.CLOSED


def test_late_server_key_is_skipped(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(server.server_key() + frame(0x06))
    assert events(conn) == [KeepAlive()]
    assert conn.data_to_send() == b""  # no second ClientInfo


# -- fast start ----------------------------------------------------------------------------------


def test_fast_start(server: FakeServer, priv: NodePrivateKey) -> None:
    info = ClientInfo(app_name="fast")
    conn = ClientConnection(priv, info, server_key=server.key.public)
    assert conn.fast_start
    assert conn.state is ClientState.AWAIT_SERVER_INFO
    # ClientInfo is queued at construction, before anything arrives.
    assert server.accept_client_info(conn.data_to_send()) == b""
    assert server.client_info == info
    # The server still sends ServerKey first: skipped, and no second ClientInfo.
    conn.receive_data(server.server_key())
    assert events(conn) == []
    assert conn.data_to_send() == b""
    assert conn.state is ClientState.AWAIT_SERVER_INFO
    conn.receive_data(server.server_info() + frame(0x06))
    assert events(conn) == [Connected(server.key.public, ServerInfo()), KeepAlive()]
    assert conn.data_to_send() == b""


def test_fast_start_server_info_without_server_key(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv, server_key=server.key.public)
    server.accept_client_info(conn.data_to_send())
    conn.receive_data(server.server_info())
    assert events(conn) == [Connected(server.key.public, ServerInfo())]


def test_fast_start_mismatched_server_key(server: FakeServer, priv: NodePrivateKey) -> None:
    other = NodePrivateKey.generate()
    conn = ClientConnection(priv, server_key=other.public)
    conn.data_to_send()
    conn.receive_data(server.server_key())
    with pytest.raises(HandshakeError) as ei:
        conn.next_event()
    assert ei.value.reason == "server_key_mismatch"
    assert conn.state is ClientState.CLOSED


def test_fast_start_frame_before_server_info(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = ClientConnection(priv, server_key=server.key.public)
    conn.receive_data(server.server_key() + frame(0x06))
    with pytest.raises(HandshakeError) as ei:
        conn.next_event()
    assert ei.value.reason == "expected_server_info"


def test_fast_start_low_order_key(priv: NodePrivateKey) -> None:
    with pytest.raises(HandshakeError):
        ClientConnection(priv, server_key=NodePublicKey(bytes(32)))


def test_fast_start_may_send_before_server_info(server: FakeServer, priv: NodePrivateKey) -> None:
    """Like Go, a fast-start client hands the connection out before ServerInfo arrives."""
    conn = ClientConnection(priv, server_key=server.key.public)
    assert conn.send_packet(K1, b"x") == frame(0x04, K1 + b"x")


# -- size limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0x01, 0x03, 0x05, 0x0B])
def test_frame_over_1mib_rejected_before_handshake(priv: NodePrivateKey, t: int) -> None:
    conn = ClientConnection(priv)
    conn.receive_data(hdr(t, CLIENT_MAX_FRAME_READ + 1))  # header only: no payload buffered
    with pytest.raises(FrameError) as ei:
        conn.next_event()
    assert ei.value.reason == "frame_too_large"
    assert conn.state is ClientState.CLOSED


@pytest.mark.parametrize("t", [0x05, 0x06, 0x0B, 0x14, 0xFF])
def test_frame_over_1mib_rejected_after_handshake(server: FakeServer, priv: NodePrivateKey, t: int) -> None:
    conn = connect(server, priv)
    conn.receive_data(hdr(t, CLIENT_MAX_FRAME_READ + 1))
    with pytest.raises(FrameError) as ei:
        conn.next_event()
    assert ei.value.reason == "frame_too_large"
    assert conn.state is ClientState.CLOSED


def test_frame_of_exactly_1mib_accepted(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    body = bytes(CLIENT_MAX_FRAME_READ - 32)
    conn.receive_data(frame(0x05, K1 + body))
    assert events(conn) == [RecvPacket(K1, body)]


# -- frames after the handshake ------------------------------------------------------------------


def test_server_ping_gets_identical_pong(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(bytes([0x12, 0x00, 0x00, 0x00, 0x08, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x2A]))
    assert events(conn) == [Ping(PING8)]
    assert conn.data_to_send() == bytes(
        [0x13, 0x00, 0x00, 0x00, 0x08, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x2A]
    )
    assert conn.data_to_send() == b""


def test_long_server_ping_pong_carries_first_8(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(frame(0x12, PING8 + b"padding") + frame(0x12, b"ABCDEFGH"))
    assert events(conn) == [Ping(PING8), Ping(b"ABCDEFGH")]
    assert conn.data_to_send() == frame(0x13, PING8) + frame(0x13, b"ABCDEFGH")


def test_pong_from_server(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(frame(0x13, PING8))
    assert events(conn) == [Pong(PING8)]
    assert conn.data_to_send() == b""


def test_health(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(frame(0x14, b"BAD") + frame(0x14, b""))
    evs = events(conn)
    assert evs == [Health("BAD"), Health("")]
    assert isinstance(evs[0], Health)
    assert evs[0].problem == "BAD"


def test_restarting(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(bytes([0x15, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 2]))
    [ev] = events(conn)
    assert ev == Restarting(1, 2)
    assert isinstance(ev, Restarting)
    assert ev.reconnect_in_ms == 1
    assert ev.try_for_ms == 2


def test_unknown_frames_are_events(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(frame(0x0D, b"future") + frame(0x06))
    assert events(conn) == [UnknownFrame(0x0D, b"future"), KeepAlive()]


def test_malformed_frame_after_handshake_closes(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    conn.receive_data(frame(0x12, PING8[:7]))
    with pytest.raises(FrameError) as ei:
        conn.next_event()
    assert ei.value.reason == "bad_ping_len"
    assert conn.state is ClientState.CLOSED
    assert conn.data_to_send() == b""


def test_closed_connection_is_unusable(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    # A bad frame followed by good ones: nothing after the error is delivered.
    conn.receive_data(frame(0x07, b"") + frame(0x06) + frame(0x12, PING8))
    with pytest.raises(FrameError):
        conn.next_event()
    with pytest.raises(ProtocolError) as ei:
        conn.next_event()
    assert ei.value.reason == "closed"
    with pytest.raises(ProtocolError) as ei:
        conn.receive_data(frame(0x06))
    assert ei.value.reason == "closed"
    assert conn.data_to_send() == b""
    with pytest.raises(ProtocolError):
        conn.send_packet(K1, b"x")


# -- sending -------------------------------------------------------------------------------------


def test_send_frames_exact_bytes(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    k2 = bytes(range(0x41, 0x61))
    assert conn.send_packet(K1, b"hello") == hdr(0x04, 37) + K1 + b"hello"
    assert conn.send_packet(NodePublicKey(K1), b"") == hdr(0x04, 32) + K1
    assert conn.forward_packet(K1, NodePublicKey(k2), b"p") == hdr(0x0A, 65) + K1 + k2 + b"p"
    assert conn.note_preferred(True) == bytes([0x07, 0, 0, 0, 1, 1])
    assert conn.note_preferred(False) == bytes([0x07, 0, 0, 0, 1, 0])
    assert conn.ping(PING8) == bytes([0x12, 0, 0, 0, 8]) + PING8
    assert conn.pong(PING8) == bytes([0x13, 0, 0, 0, 8]) + PING8
    assert conn.watch_conns() == bytes([0x10, 0, 0, 0, 0])
    assert conn.close_peer(NodePublicKey(k2)) == hdr(0x11, 32) + k2
    assert conn.close_peer(k2) == hdr(0x11, 32) + k2
    assert conn.data_to_send() == b""  # send methods return bytes, they do not queue


def test_send_packet_size_limit(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    assert len(conn.send_packet(K1, bytes(MAX_PACKET_SIZE))) == 5 + 32 + MAX_PACKET_SIZE
    with pytest.raises(ValueError, match="exceeds 65536"):
        conn.send_packet(K1, bytes(MAX_PACKET_SIZE + 1))


def test_check_frame_size() -> None:
    ClientConnection.check_frame_size(bytes(5 + (10 << 20)))
    with pytest.raises(ValueError, match="10 MiB"):
        ClientConnection.check_frame_size(bytes(5 + (10 << 20) + 1))


SENDERS = [
    lambda c: c.send_packet(K1, b"x"),
    lambda c: c.forward_packet(K1, K1, b"x"),
    lambda c: c.note_preferred(True),
    lambda c: c.ping(PING8),
    lambda c: c.pong(PING8),
    lambda c: c.watch_conns(),
    lambda c: c.close_peer(K1),
]


@pytest.mark.parametrize("send", SENDERS)
def test_sending_before_connect_raises(server: FakeServer, priv: NodePrivateKey, send: object) -> None:
    conn = ClientConnection(priv)
    with pytest.raises(ProtocolError) as ei:
        send(conn)  # type: ignore[operator]
    assert ei.value.reason == "not_connected"
    conn.receive_data(server.server_key())
    events(conn)
    assert conn.state is ClientState.AWAIT_SERVER_INFO
    with pytest.raises(ProtocolError) as ei:
        send(conn)  # type: ignore[operator]
    assert ei.value.reason == "not_connected"


# -- client token bucket (client_test.go TestClientSendRateLimiting) -------------------------------


PKT = bytes(1000)
FRAME_COST = 5 + 32 + len(PKT)  # 1037


def test_no_rate_limit_by_default(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv)
    sent = [conn.send_packet(K1, PKT, now=0.0) for _ in range(1000)]
    assert all(len(s) == FRAME_COST for s in sent)
    assert conn.dropped_by_rate_limit == 0


@pytest.mark.parametrize(
    "info", [ServerInfo(2, 0, 0), ServerInfo(2, 0, 2 * FRAME_COST)], ids=["zero", "burst-only"]
)
def test_rate_limit_inactive_at_zero_rate(server: FakeServer, priv: NodePrivateKey, info: ServerInfo) -> None:
    conn = connect(server, priv, info)
    assert all(conn.send_packet(K1, PKT, now=0.0) for _ in range(1000))
    assert conn.dropped_by_rate_limit == 0


def test_rate_limit_drops_sends(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv, ServerInfo(2, 1, 2 * FRAME_COST))
    sent = [conn.send_packet(K1, PKT, now=0.0) for _ in range(1000)]
    assert sum(len(s) for s in sent) == 2 * FRAME_COST  # the burst, then silence
    assert sent[0] == sent[1] == hdr(0x04, 32 + len(PKT)) + K1 + PKT
    assert all(s == b"" for s in sent[2:])
    assert conn.dropped_by_rate_limit == 998


def test_rate_limit_refills_with_time(server: FakeServer, priv: NodePrivateKey) -> None:
    conn = connect(server, priv, ServerInfo(2, FRAME_COST, FRAME_COST))  # one packet per second
    t = 100.0
    assert conn.send_packet(K1, PKT, now=t)
    assert conn.send_packet(K1, PKT, now=t) == b""
    assert conn.send_packet(K1, PKT, now=t + 0.5) == b""
    assert conn.send_packet(K1, PKT, now=t + 1.0)
    assert conn.send_packet(K1, PKT, now=t + 1.0) == b""
    # A long pause never banks more than the burst.
    assert conn.send_packet(K1, PKT, now=t + 1000.0)
    assert conn.send_packet(K1, PKT, now=t + 1000.0) == b""
    assert conn.dropped_by_rate_limit == 4
    # The charge is 5 + 32 + len(packet): a smaller packet fits in what is left.
    assert conn.send_packet(K1, PKT, now=t + 1000.1) == b""
    assert conn.send_packet(K1, b"", now=t + 1000.1)  # 103.7 tokens refilled, 37 needed


def test_token_bucket_unit() -> None:
    b = TokenBucket(rate=10, burst=20, now=5.0)
    assert b.try_take(20, 5.0)
    assert not b.try_take(1, 5.0)
    assert not b.try_take(1, 4.0)  # time going backwards adds nothing
    assert b.try_take(10, 6.0)
    assert not b.try_take(1, 6.0)
    assert not b.try_take(21, 100.0)  # more than the burst never fits
    assert b.try_take(20, 100.0)
