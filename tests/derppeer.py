"""A minimal, strict DERP client for the relay's conformance tests.

Built on natlib's sans-io ClientConnection over plain trio sockets (optionally TLS through
trio.SSLStream), so relay tests do not depend on natlib's own driver. Every receive has a
deadline; nothing sleeps.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import trio

from natlib.derp import (
    NEED_DATA,
    ClientConnection,
    ClientInfo,
    Connected,
    Frame,
    KeepAlive,
    Pong,
)
from natlib.keys import NodePrivateKey, NodePublicKey

RECV_TIMEOUT = 5.0


@dataclass
class RelayHandle:
    """What the relay fixtures yield."""

    relay: object
    host: str
    port: int
    server_key: NodePublicKey
    scheme: str = "http"
    ca: object | None = None
    client_ssl_context: ssl.SSLContext | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/derp"


OPEN_STREAMS: list[trio.abc.Stream] = []  # closed by the relay fixtures at teardown


class Peer:
    """One connected DERP client. Tests need not close it: the relay fixture does."""

    def __init__(self, stream: trio.abc.Stream, conn: ClientConnection) -> None:
        self.stream = stream
        self.conn = conn
        self.key = conn.private_key.public
        self._events: list[Frame] = []

    @classmethod
    async def connect(
        cls,
        relay: RelayHandle,
        *,
        key: NodePrivateKey | None = None,
        info: ClientInfo | None = None,
        fast_start: bool = False,
        extra_headers: bytes = b"",
    ) -> Peer:
        stream: trio.abc.Stream = await trio.open_tcp_stream(relay.host, relay.port)
        if relay.client_ssl_context is not None:
            tls = trio.SSLStream(
                stream, relay.client_ssl_context, server_hostname=relay.host, https_compatible=True
            )
            await tls.do_handshake()
            stream = tls
        priv = key or NodePrivateKey.generate()
        conn = ClientConnection(priv, info, server_key=relay.server_key if fast_start else None)
        request = (
            f"GET /derp HTTP/1.1\r\nHost: {relay.host}:{relay.port}\r\n"
            "Upgrade: DERP\r\nConnection: Upgrade\r\n".encode()
            + (b"Derp-Fast-Start: 1\r\n" if fast_start else b"")
            + extra_headers
            + b"\r\n"
        )
        peer = cls(stream, conn)
        OPEN_STREAMS.append(stream)
        await stream.send_all(request + conn.data_to_send())
        buf = b""
        with trio.fail_after(RECV_TIMEOUT):
            if not fast_start:
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise ConnectionError(f"closed during upgrade: {buf!r}")
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                peer.upgrade_response = head + b"\r\n\r\n"
                if not head.startswith(b"HTTP/1.1 101 "):
                    raise ConnectionError(f"upgrade refused: {head!r}")
            if buf:
                conn.receive_data(buf)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    out = conn.data_to_send()
                    if out:
                        await stream.send_all(out)
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise ConnectionError("closed during handshake")
                    conn.receive_data(chunk)
                    continue
                if isinstance(ev, Connected):
                    break
                raise AssertionError(f"unexpected event before Connected: {ev!r}")
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)
        return peer

    upgrade_response: bytes = b""

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, dst: NodePublicKey | bytes, packet: bytes) -> None:
        await self.stream.send_all(self.conn.send_packet(dst, packet))

    async def recv(self, timeout: float = RECV_TIMEOUT, *, skip_keepalive: bool = True) -> Frame:
        """The next frame from the server; fails the test after ``timeout`` seconds."""
        with trio.fail_after(timeout):
            while True:
                if self._events:
                    return self._events.pop(0)
                ev = self.conn.next_event()
                if ev is NEED_DATA:
                    out = self.conn.data_to_send()
                    if out:
                        await self.stream.send_all(out)
                    chunk = await self.stream.receive_some(65536)
                    if not chunk:
                        raise EOFError("server closed the connection")
                    self.conn.receive_data(chunk)
                    continue
                assert not isinstance(ev, Connected)
                if skip_keepalive and isinstance(ev, KeepAlive):
                    continue
                return ev

    async def expect_closed(self, timeout: float = RECV_TIMEOUT) -> None:
        """Read until the server closes the connection (frames before that are discarded)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    return

    async def barrier(self) -> list[Frame]:
        """Send a Ping and collect every frame that arrives before its Pong.

        The relay handles a client's frames in order and writes queued control frames (PeerGone,
        PeerPresent) before a Pong, so "nothing before the Pong" proves the relay did not react to
        what this client sent earlier — a deterministic replacement for waiting and hoping.
        """
        self._ping_seq = getattr(self, "_ping_seq", 0) + 1
        data = self._ping_seq.to_bytes(8, "big")
        await self.stream.send_all(self.conn.ping(data))
        seen: list[Frame] = []
        while True:
            ev = await self.recv()
            if isinstance(ev, Pong) and ev.data == data:
                return seen
            seen.append(ev)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def close_all_peers() -> None:
    """Close every client stream a test opened; the relay fixtures call this at teardown."""
    while OPEN_STREAMS:
        stream = OPEN_STREAMS.pop()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
