"""DERP over WebSocket (spec §4.3): subprotocol ``derp``, binary messages, boundaries ignored."""

from __future__ import annotations

import trio
from derppeer import OPEN_STREAMS, Peer, RelayHandle
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from natlib.derp import NEED_DATA, ClientConnection, Connected, RecvPacket
from natlib.keys import NodePrivateKey


class WsPeer:
    """A DERP client speaking through a WebSocket, splitting its writes into odd message sizes."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection, conn: ClientConnection) -> None:
        self.stream, self.ws, self.conn = stream, ws, conn

    @classmethod
    async def connect(cls, relay: RelayHandle, subprotocol: str = "derp") -> WsPeer:
        stream = await trio.open_tcp_stream(relay.host, relay.port)
        OPEN_STREAMS.append(stream)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="relay.test", target="/derp", subprotocols=[subprotocol])))
        peer = cls(stream, ws, ClientConnection(NodePrivateKey.generate()))
        with trio.fail_after(5):
            while True:
                ev = await peer._next()
                if isinstance(ev, Connected):
                    return peer

    async def _pump(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                assert event.subprotocol == "derp"
            elif isinstance(event, BytesMessage):
                self.conn.receive_data(event.data)
            elif isinstance(event, CloseConnection | TextMessage):
                raise EOFError

    async def _next(self) -> object:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            out = self.conn.data_to_send()
            if out:
                await self.send_bytes(out)
            await self._pump()

    async def send_bytes(self, data: bytes) -> None:
        # Deliberately split one DERP frame over several messages: the relay must ignore boundaries.
        for i in range(0, len(data), 7):
            await self.stream.send_all(self.ws.send(BytesMessage(data=data[i : i + 7])))

    async def recv(self) -> object:
        with trio.fail_after(5):
            return await self._next()


async def test_websocket_clients_exchange_packets(relay_http: RelayHandle) -> None:
    a = await WsPeer.connect(relay_http)
    b = await WsPeer.connect(relay_http)
    plain = await Peer.connect(relay_http)
    await a.send_bytes(a.conn.send_packet(b.conn.private_key.public, b"over websocket"))
    assert await b.recv() == RecvPacket(a.conn.private_key.public.raw, b"over websocket")
    await plain.send(a.conn.private_key.public, b"mixed transports")
    assert await a.recv() == RecvPacket(plain.key.raw, b"mixed transports")
    assert relay_http.relay.stats.websocket_accepts == 2  # type: ignore[attr-defined]


async def test_text_message_closes_only_that_connection(relay_http: RelayHandle) -> None:
    a = await WsPeer.connect(relay_http)
    b = await WsPeer.connect(relay_http)
    await a.stream.send_all(a.ws.send(TextMessage(data="not binary")))
    with trio.fail_after(5):
        closed = False
        while not closed:
            try:
                await a._pump()
            except (EOFError, trio.BrokenResourceError):
                closed = True
    stats = relay_http.relay.stats  # type: ignore[attr-defined]
    assert stats.protocol_errors["websocket_text_message"] == 1
    await b.send_bytes(b.conn.send_packet(b.conn.private_key.public, b"alive"))
    assert await b.recv() == RecvPacket(b.conn.private_key.public.raw, b"alive")
