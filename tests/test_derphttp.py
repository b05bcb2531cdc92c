"""natlib.derphttp, natlib's DERP client driver, against the real relay over real sockets.

The relay fixtures (``relay_http``, ``relay_https``) come from ``conftest.py``. Every wait has a
deadline (``anyio.fail_after``) and nothing sleeps: ordering is established with DERP Ping/Pong,
which the relay answers only after it has handled everything the client sent before.

Most tests run under trio (pytest-trio's trio mode). ``test_exchange_under_asyncio`` runs the same
exchange under asyncio, with the (trio) relay in a background thread.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from natlib.derp import KeepAlive, PeerGone, PeerGoneReason, PeerPresent, PeerPresentFlags, Pong, RecvPacket
from natlib.derphttp import (
    DerpClient,
    DerpConnectError,
    DerpConnectionClosed,
    DerpConnectTimeout,
    DerpEvent,
    connect,
)
from natlib.keys import NodePrivateKey, NodePublicKey

DEADLINE = 5.0


def _tls_context(relay: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    relay.ca.configure_trust(ctx)
    return ctx


async def _next(client: DerpClient, *, skip_keepalive: bool = True) -> DerpEvent:
    """The next event (KeepAlives skipped), or fail the test after DEADLINE seconds."""
    with anyio.fail_after(DEADLINE):
        while True:
            event = await client.receive()
            if skip_keepalive and isinstance(event, KeepAlive):
                continue
            return event


async def _recv_packet(client: DerpClient) -> RecvPacket:
    event = await _next(client)
    assert isinstance(event, RecvPacket), event
    return event


async def _receive_until_closed(client: DerpClient) -> None:
    """Receive (and discard) until the connection ends; DerpConnectionClosed propagates."""
    while True:
        await client.receive()


async def _exchange(a: DerpClient, b: DerpClient) -> None:
    """Packets both ways, including an empty one and a maximum-size one."""
    await a.send(b.local_key, b"hello from a")
    got = await _recv_packet(b)
    assert NodePublicKey(got.src) == a.local_key
    assert got.packet == b"hello from a"

    await b.send(a.local_key, b"hello from b")
    got = await _recv_packet(a)
    assert NodePublicKey(got.src) == b.local_key
    assert got.packet == b"hello from b"

    big = bytes(range(256)) * 256  # 65536 bytes, DERP's maximum
    for packet in (b"", big):
        await a.send(b.local_key, packet)
        got = await _recv_packet(b)
        assert got.packet == packet


# -- connecting, and the core exchange over every transport -------------------------------------


async def test_exchange_plain_http(relay_http: Any) -> None:
    ka, kb = NodePrivateKey.generate(), NodePrivateKey.generate()
    async with await connect(relay_http.url, ka) as a, await connect(relay_http.url, kb) as b:
        assert a.server_key == relay_http.server_key
        assert a.local_key == ka.public
        assert a.server_info.version == 2
        assert not a.fast_start and not a.websocket
        await _exchange(a, b)


async def test_exchange_tls(relay_https: Any) -> None:
    ctx = _tls_context(relay_https)
    async with (
        await connect(relay_https.url, NodePrivateKey.generate(), ssl_context=ctx) as a,
        await connect(relay_https.url, NodePrivateKey.generate(), ssl_context=ctx) as b,
    ):
        assert a.server_key == relay_https.server_key
        await _exchange(a, b)


async def test_exchange_websocket(relay_http: Any) -> None:
    async with (
        await connect(relay_http.url, NodePrivateKey.generate(), websocket=True) as a,
        await connect(relay_http.url, NodePrivateKey.generate()) as b,  # raw DERP on the other side
    ):
        assert a.websocket and a.server_key == relay_http.server_key
        await _exchange(a, b)
        assert await a.ping() >= 0.0


async def test_exchange_websocket_over_tls(relay_https: Any) -> None:
    ctx = _tls_context(relay_https)
    url = relay_https.url.replace("https://", "wss://")
    async with (
        await connect(url, NodePrivateKey.generate(), ssl_context=ctx) as a,
        await connect(url, NodePrivateKey.generate(), ssl_context=ctx) as b,
    ):
        assert a.websocket and b.websocket
        await _exchange(a, b)


async def test_fast_start_over_tls(relay_https: Any) -> None:
    ctx = _tls_context(relay_https)
    key = relay_https.server_key
    async with (
        await connect(relay_https.url, NodePrivateKey.generate(), ssl_context=ctx, server_key=key) as a,
        await connect(relay_https.url, NodePrivateKey.generate(), ssl_context=ctx, server_key=key) as b,
    ):
        assert a.fast_start and b.fast_start
        assert a.server_key == key
        await _exchange(a, b)


async def test_fast_start_plain(relay_http: Any) -> None:
    key = relay_http.server_key
    async with (
        await connect(relay_http.url, NodePrivateKey.generate(), server_key=key) as a,
        await connect(relay_http.url, NodePrivateKey.generate()) as b,
    ):
        assert a.fast_start and not b.fast_start
        await _exchange(a, b)


async def test_wrong_server_key_is_refused(relay_http: Any) -> None:
    wrong = NodePrivateKey.generate().public
    with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectError, match="expected"):
        await connect(relay_http.url, NodePrivateKey.generate(), server_key=wrong)
    with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectError, match="expected"):
        await connect(relay_http.url, NodePrivateKey.generate(), server_key=wrong, websocket=True)


async def test_tls_with_untrusted_certificate_fails(relay_https: Any) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectError, match="TLS") as info:
        await connect(relay_https.url, NodePrivateKey.generate(), ssl_context=ssl.create_default_context())
    assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_pinned_certificate_replaces_the_ca_check(relay_https: Any) -> None:
    """``cert_sha256`` (a ``sha256-raw:`` CertName): the right leaf connects with no trusted CA, any
    other certificate is refused before the upgrade."""
    pem = await trio.to_thread.run_sync(ssl.get_server_certificate, (relay_https.host, relay_https.port))
    pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest()
    with anyio.fail_after(DEADLINE):
        async with await connect(relay_https.url, NodePrivateKey.generate(), cert_sha256=pin) as client:
            assert client.server_key == relay_https.server_key
    wrong = hashlib.sha256(b"another certificate").digest()
    with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectError, match="is not the pinned") as info:
        await connect(relay_https.url, NodePrivateKey.generate(), cert_sha256=wrong)
    assert f"sha256-raw:{pin.hex()}" in str(info.value)
    with pytest.raises(ValueError, match="32 bytes"):
        await connect(relay_https.url, NodePrivateKey.generate(), cert_sha256=pin[:8])
    with pytest.raises(ValueError, match="plain URL"):
        await connect("http://127.0.0.1:1/derp", NodePrivateKey.generate(), cert_sha256=pin)


async def test_bogus_upgrade_gives_426(relay_http: Any) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectError) as info:
        await connect(relay_http.url, NodePrivateKey.generate(), extra_headers=[("Upgrade", "bogus")])
    err = info.value
    assert err.status == 426
    assert b"DERP requires connection upgrade" in err.body
    assert "426" in str(err) and relay_http.url in str(err)


async def test_connect_timeout_against_silent_listener() -> None:
    """A listener that accepts TCP (kernel backlog) but never answers the upgrade."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        start = trio.current_time()
        with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectTimeout) as info:
            await connect(f"http://127.0.0.1:{port}/derp", NodePrivateKey.generate(), connect_timeout=0.3)
        assert 0.3 <= trio.current_time() - start < DEADLINE
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, DerpConnectError)


async def test_connection_refused() -> None:
    sock = trio.socket.socket()
    with sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connecting is refused
        with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectError, match="cannot connect"):
            await connect(f"http://127.0.0.1:{port}/derp", NodePrivateKey.generate())


async def test_bad_arguments() -> None:
    key = NodePrivateKey.generate()
    with pytest.raises(ValueError, match="scheme"):
        await connect("ftp://127.0.0.1/derp", key)
    with pytest.raises(ValueError, match="ssl_context"):
        await connect("http://127.0.0.1:1/derp", key, ssl_context=ssl.create_default_context())
    with pytest.raises(ValueError, match="mesh_key"):
        await connect("http://127.0.0.1:1/derp", key, mesh_key=b"short")


# -- after the handshake ------------------------------------------------------------------------


async def test_ping_rtt(relay_http: Any) -> None:
    async with await connect(relay_http.url, NodePrivateKey.generate()) as c:
        with anyio.fail_after(DEADLINE):
            rtts = [await c.ping() for _ in range(3)]
            rtts.append(await c.ping(b"12345678"))
        assert all(0.0 <= rtt < DEADLINE for rtt in rtts)
        with pytest.raises(ValueError, match="8 bytes"):
            await c.ping(b"short")


async def test_ping_while_another_task_receives(relay_http: Any) -> None:
    """One task blocked in receive(), others pinging: Pongs go to ping(), packets to receive()."""
    async with await connect(relay_http.url, NodePrivateKey.generate()) as c:
        received: list[DerpEvent] = []
        receiving = trio.Event()

        async def receiver() -> None:
            receiving.set()
            received.append(await _next(c))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await receiving.wait()
            with anyio.fail_after(DEADLINE):
                await trio.testing.wait_all_tasks_blocked()
                async with trio.open_nursery() as pingers:
                    for _ in range(3):
                        pingers.start_soon(c.ping)
                await c.send(c.local_key, b"to myself")  # the relay delivers to the sender too
        assert len(received) == 1
        event = received[0]
        assert isinstance(event, RecvPacket) and event.packet == b"to myself"
        assert NodePublicKey(event.src) == c.local_key


async def test_cancelled_ping_leaves_connection_usable(relay_http: Any) -> None:
    async with await connect(relay_http.url, NodePrivateKey.generate()) as c:
        with trio.CancelScope() as scope:
            scope.cancel()
            await c.ping(b"abandon!")
        assert not c.is_closed
        await c.send(c.local_key, b"marker")
        event = await _next(c)
        assert not isinstance(event, Pong), event
        assert isinstance(event, RecvPacket) and event.packet == b"marker"
        with anyio.fail_after(DEADLINE):
            await c.ping(b"abandon!")  # the same data again works


async def test_receive_cancellation_loses_nothing(relay_http: Any) -> None:
    async with await connect(relay_http.url, NodePrivateKey.generate()) as c:
        with trio.move_on_after(0.05):
            await c.receive()  # nothing to receive yet: cancelled
        await c.send(c.local_key, b"after cancel")
        assert (await _recv_packet(c)).packet == b"after cancel"


async def test_send_packets_delivers_a_burst_in_order(relay_http: Any) -> None:
    async with (
        await connect(relay_http.url, NodePrivateKey.generate()) as a,
        await connect(relay_http.url, NodePrivateKey.generate()) as b,
    ):
        burst = [b"burst %03d" % i for i in range(100)] + [b""]
        await a.send_packets([(b.local_key, p) for p in burst])
        got = [await _recv_packet(b) for _ in burst]
        assert [g.packet for g in got] == burst
        assert {NodePublicKey(g.src) for g in got} == {a.local_key}
        # One oversized packet: nothing of the burst is sent.
        with pytest.raises(ValueError, match="exceeds DERP's 65536"):
            await a.send_packets([(b.local_key, b"not sent"), (b.local_key, bytes(65537))])
        await a.send(b.local_key, b"after")
        assert (await _recv_packet(b)).packet == b"after"


async def test_peer_gone_when_sender_closes(relay_http: Any) -> None:
    async with await connect(relay_http.url, NodePrivateKey.generate()) as b:
        a = await connect(relay_http.url, NodePrivateKey.generate())
        a_key = a.local_key
        async with a:
            await a.send(b.local_key, b"remember me")
            assert (await _recv_packet(b)).packet == b"remember me"
        assert a.is_closed
        with pytest.raises(DerpConnectionClosed) as info:
            await a.send(b.local_key, b"too late")
        assert info.value.reason == "closed"
        event = await _next(b)
        assert isinstance(event, PeerGone), event
        assert NodePublicKey(event.key) == a_key
        assert event.reason == PeerGoneReason.DISCONNECTED


async def test_note_preferred(relay_http: Any) -> None:
    stats = relay_http.relay.stats
    before = stats.current_home_connections
    async with await connect(relay_http.url, NodePrivateKey.generate()) as c:
        await c.note_preferred(True)
        with anyio.fail_after(DEADLINE):
            await c.ping()  # the relay handles frames in order: NotePreferred is done
        assert stats.current_home_connections == before + 1
        await c.note_preferred(False)
        with anyio.fail_after(DEADLINE):
            await c.ping()
        assert stats.current_home_connections == before


async def test_watch_conns_with_mesh_key(relay_http: Any, mesh_key: bytes) -> None:
    async with (
        await connect(relay_http.url, NodePrivateKey.generate()) as other,
        await connect(relay_http.url, NodePrivateKey.generate(), mesh_key=mesh_key) as watcher,
    ):
        await watcher.watch_conns()
        present: dict[NodePublicKey, PeerPresent] = {}
        while len(present) < 2:
            event = await _next(watcher)
            assert isinstance(event, PeerPresent), event
            present[NodePublicKey(event.key)] = event
        assert set(present) == {watcher.local_key, other.local_key}
        assert present[watcher.local_key].flags & PeerPresentFlags.IS_MESH_PEER
        assert present[other.local_key].flags & PeerPresentFlags.IS_REGULAR

        # A newcomer is announced; its departure is reported.
        late = await connect(relay_http.url, NodePrivateKey.generate())
        late_key = late.local_key
        async with late:
            event = await _next(watcher)
            assert isinstance(event, PeerPresent) and NodePublicKey(event.key) == late_key
        event = await _next(watcher)
        assert isinstance(event, PeerGone) and NodePublicKey(event.key) == late_key
        assert event.reason == PeerGoneReason.DISCONNECTED


async def test_watch_conns_without_mesh_key_is_fatal(relay_http: Any) -> None:
    async with await connect(relay_http.url, NodePrivateKey.generate()) as c:
        await c.watch_conns()
        with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectionClosed) as info:
            await _receive_until_closed(c)
        assert info.value.reason in ("eof", "transport_error")
        assert c.is_closed
        with pytest.raises(DerpConnectionClosed):
            await c.ping()


async def test_wrong_mesh_key_is_not_a_mesh_peer(relay_http: Any, mesh_key: bytes) -> None:
    """A mesh key that differs from the relay's is only "not a mesh peer", not a rejection."""
    wrong = bytes(b ^ 0xFF for b in mesh_key)
    async with await connect(relay_http.url, NodePrivateKey.generate(), mesh_key=wrong) as c:
        await c.watch_conns()
        with anyio.fail_after(DEADLINE), pytest.raises(DerpConnectionClosed):
            await _receive_until_closed(c)


async def test_aclose_wakes_a_blocked_receiver(relay_http: Any) -> None:
    async with await connect(relay_http.url, NodePrivateKey.generate()) as c:
        errors: list[DerpConnectionClosed] = []

        async def receiver() -> None:
            try:
                await c.receive()
            except DerpConnectionClosed as e:
                errors.append(e)

        with anyio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                await c.aclose()
        assert [e.reason for e in errors] == ["closed"]
        await c.aclose()  # idempotent


# -- the same exchange under asyncio -----------------------------------------------------------------


@contextmanager
def _relay_in_thread() -> Iterator[tuple[str, NodePublicKey]]:
    """Run the (trio) relay in a background thread; yield its URL and key."""
    from relay import RelayServer

    key = NodePrivateKey.generate()
    server = RelayServer(key, hostname="relay.test")
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: server.serve_tcp("127.0.0.1", 0, task_status=task_status)
            )
            state["port"] = bound[0][1]
            state["token"] = trio.lowlevel.current_trio_token()
            state["scope"] = nursery.cancel_scope
            ready.set()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as e:  # reported to the test below
            state["error"] = e
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="relay", daemon=True)
    thread.start()
    try:
        assert ready.wait(DEADLINE), "relay thread did not start"
        if "error" in state:
            raise state["error"]
        yield f"http://127.0.0.1:{state['port']}/derp", key.public
    finally:
        if "token" in state:

            def stop() -> None:
                server.close_all_connections()
                state["scope"].cancel()

            trio.from_thread.run_sync(stop, trio_token=state["token"])
        thread.join(DEADLINE)
        assert not thread.is_alive(), "relay thread did not stop"
        if "error" in state:
            raise state["error"]


def test_exchange_under_asyncio() -> None:
    """A plain sync test (so pytest-trio leaves it alone) that runs the client under asyncio."""

    async def main(url: str, server_key: NodePublicKey) -> None:
        with anyio.fail_after(4 * DEADLINE):
            async with (
                await connect(url, NodePrivateKey.generate()) as a,
                await connect(url, NodePrivateKey.generate(), server_key=server_key) as b,
                await connect(url, NodePrivateKey.generate(), websocket=True) as c,
            ):
                assert b.fast_start and c.websocket
                await _exchange(a, b)
                await _exchange(b, c)
                async with anyio.create_task_group() as tg:
                    received: list[DerpEvent] = []

                    async def receiver() -> None:
                        received.append(await _next(a))

                    tg.start_soon(receiver)
                    assert await a.ping() >= 0.0
                    await b.send(a.local_key, b"done")
                assert isinstance(received[0], RecvPacket) and received[0].packet == b"done"

    with _relay_in_thread() as (url, server_key):
        anyio.run(main, url, server_key, backend="asyncio")


def test_reconnect_schedule_backs_off_but_retries_fast_in_a_restart_window() -> None:
    from natlib.derp import Restarting
    from natlib.derphttp import ReconnectSchedule

    s = ReconnectSchedule()
    assert [s.failed(0.0) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    s.connected()
    s.restarting(10.0, Restarting(reconnect_in_ms=1000, try_for_ms=3000))
    assert [s.failed(t) for t in (10.0, 11.0, 12.9)] == [0.1, 0.1, 0.1]
    assert s.failed(13.0) == 0.8  # the window is over: the back-off went on meanwhile
    s.connected()
    assert s.failed(20.0) == 0.1
