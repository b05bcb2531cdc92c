"""DERP over WebSocket: a :class:`Transport` that carries the DERP byte stream in binary messages.

Spec §4.3: subprotocol ``derp``, compression off, binary messages only. Each write becomes one
message, or several of at most 16 KiB (Go peers read at most 32 KiB per message); reads
concatenate message payloads into one byte stream and ignore message boundaries, so DERP's own
size limits apply to the stream, not to messages. A text message closes the connection. WebSocket
pings are answered; a close frame is answered and reads then return EOF.
"""

from __future__ import annotations

from typing import Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from natlib.derp import ProtocolError

from ._transport import Transport

__all__ = ["WebSocketTransport", "accept_websocket"]

_READ_SIZE = 64 << 10
# Largest WebSocket message we write: github.com/coder/websocket, which Tailscale's Go client uses,
# reads at most 32 KiB per message by default (SetReadLimit is never called) and closes the
# connection with "message too big" otherwise.
_MAX_MESSAGE: Final = 16 << 10


class WebSocketTransport:
    """Adapts a byte transport carrying WebSocket frames to the DERP byte stream."""

    def __init__(self, inner: Transport, ws: WSConnection) -> None:
        self.inner = inner
        self._ws = ws
        self._pending = bytearray()
        self._send_lock = trio.Lock()
        self._eof = False
        self._raw = bytearray(_READ_SIZE)

    @property
    def peer_address(self) -> tuple[str, int]:
        return self.inner.peer_address

    @property
    def is_tls(self) -> bool:
        return self.inner.is_tls

    @property
    def tls_version(self) -> str | None:
        return self.inner.tls_version

    @property
    def has_backlog(self) -> bool:
        return False

    def send_nowait(self, data: bytes) -> bool:
        return False  # framing and the send lock make the writer task the only sender

    def enable_idle_spin(self) -> None:
        self.inner.enable_idle_spin()

    async def _send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self.inner.send_all(data)

    async def receive_into(self, buf: memoryview) -> int:
        while not self._pending:
            if self._eof:
                return 0
            n = await self.inner.receive_into(memoryview(self._raw))
            if n == 0:
                self._ws.receive_data(None)
                self._eof = True
            else:
                try:
                    self._ws.receive_data(bytes(self._raw[:n]))
                except RemoteProtocolError as e:
                    raise ProtocolError("websocket_protocol", f"WebSocket protocol error: {e}") from None
            await self._drain_events()
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        del self._pending[:n]
        return n

    async def _drain_events(self) -> None:
        try:
            events = list(self._ws.events())
        except RemoteProtocolError as e:
            raise ProtocolError("websocket_protocol", f"WebSocket protocol error: {e}") from None
        for event in events:
            if isinstance(event, BytesMessage):
                self._pending += event.data
            elif isinstance(event, TextMessage):
                raise ProtocolError("websocket_text_message", "text message on a DERP WebSocket")
            elif isinstance(event, Ping):
                await self._send_raw(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                try:
                    await self._send_raw(self._ws.send(event.response()))
                except (LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                self._eof = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # At most _MAX_MESSAGE bytes per message. The writer hands us a whole batch of queued
        # frames (easily more than 32 KiB), and Go's WebSocket clients (derphttp, also in the
        # browser) refuse messages over 32 KiB and drop the connection. DERP ignores message
        # boundaries, so splitting is always safe.
        view = memoryview(data)
        try:
            frames = b"".join(
                self._ws.send(Message(data=bytes(view[i : i + _MAX_MESSAGE])))
                for i in range(0, max(len(view), 1), _MAX_MESSAGE)
            )
        except LocalProtocolError as e:
            raise trio.ClosedResourceError(f"WebSocket closed: {e}") from None
        await self._send_raw(frames)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def accept_websocket(
    inner: Transport, headers: list[tuple[bytes, bytes]], target: bytes, trailing: bytes
) -> WebSocketTransport:
    """Finish the WebSocket handshake for an h11-parsed request and return the transport."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.initiate_upgrade_connection(headers, target)
    request = next(iter(ws.events()), None)
    if not isinstance(request, Request):
        raise ProtocolError("websocket_handshake", "not a WebSocket upgrade request")
    transport = WebSocketTransport(inner, ws)
    await transport._send_raw(ws.send(AcceptConnection(subprotocol="derp")))
    if trailing:
        ws.receive_data(trailing)
        await transport._drain_events()
    return transport
