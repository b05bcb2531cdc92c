"""The relay server: listeners, the HTTP front end, the DERP handshake, and process-wide state.

Connection flow, written down once::

    accept ─► [TLS handshake, 10 s] ─► HTTP/1.1 (h11, 30 s per request head)
        ├─ probes, /generate_204, home page ...     answered; keep-alive continues
        ├─ GET /derp, Upgrade: DERP                 101 (or nothing, with Derp-Fast-Start: 1)
        └─ GET /derp, Upgrade: websocket + "derp"   WebSocket 101, DERP inside binary messages
    DERP: ServerKey (10 s) ─► ClientInfo (10 s, 56 B .. 256 KiB, box must open)
        ─► admission (non-mesh clients; same 10 s; refused → closed, no ServerInfo; _admission)
        ─► register in the routing table (watchers hear PeerPresent) ─► ServerInfo
        ─► ClientConn.run(): one reader, one writer, until either ends

Every connection runs in its own task under a catch-all: whatever a client sends, only its own
connection closes, and the reason is counted in :class:`RelayStats`.

A worker of a ``-workers`` group (``_workers``) also serves a private loopback listener for its
sibling workers: there only a client presenting the group's link secret is admitted, as a sibling
link (a mesh peer that is not a client, see ``_state``). A ForwardPacket from another relay for a
client of a sibling takes one more loopback hop; one from a sibling is never forwarded again.
"""

from __future__ import annotations

import errno
import http
import logging
import math
import ssl
import struct
import sys
from collections.abc import Sequence
from typing import Final

import h11
import trio

from natlib.derp import (
    CLIENT_INFO_MAX_LEN,
    CLIENT_INFO_MIN_LEN,
    KEEP_ALIVE_INTERVAL,
    KEY_LEN,
    FrameDecoder,
    FrameType,
    HandshakeError,
    PeerGoneReason,
    ProtocolError,
    Restarting,
    ServerInfo,
    ServerInfoFrame,
    ServerKey,
    is_disco_packet,
    open_client_info,
    seal_server_info,
)
from natlib.keys import NodePrivateKey

from ._admission import AdmissionPolicy, AllowListError
from ._http import DerpUpgrade, Reply, RouteConfig, WebSocketUpgrade, route
from ._mesh import SIBLING_RUN_HEADER_LEN, WorkerLinkStats
from ._queue import DEFAULT_QUEUE_DEPTH, QueueEntry
from ._ratelimit import ConnectionLimiter, RateConfigError, RateLimits, load_rate_config
from ._sclient import KEEPALIVE_JITTER, ClientConn
from ._state import RoutingTable
from ._stats import RelayStats
from ._transport import (
    IDLE_SPIN_SECONDS,
    IdleSpin,
    SocketTransport,
    TLSTransport,
    Transport,
    configure_accepted_socket,
)
from ._ws import accept_websocket

__all__ = ["RelayServer"]

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT: Final = 10.0
HTTP_REQUEST_TIMEOUT: Final = 30.0
SERVER_KEY_TIMEOUT: Final = 10.0  # and again 10 s for ClientInfo (spec §3)
MAX_HTTP_HEADER: Final = 16 << 10
MAX_HTTP_BODY: Final = 64 << 10
_ACCEPT_RETRY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_RUN_COUNTS: Final = struct.Struct(">II")


def _reason(status: int) -> bytes:
    """The standard reason phrase ("No Content"), as Go's net/http writes it."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class RelayServer:
    """All state of one relay process, and the coroutines that serve its listeners.

    Tests and embedders create one, then ``await nursery.start(server.serve_tcp, host, port)``.
    """

    def __init__(
        self,
        private_key: NodePrivateKey,
        *,
        mesh_key: bytes | None = None,
        hostname: str = "",
        write_timeout: float = 2.0,
        keepalive_interval: float = KEEP_ALIVE_INTERVAL,
        keepalive_jitter: float = KEEPALIVE_JITTER,
        handshake_timeout: float = SERVER_KEY_TIMEOUT,
        http_timeout: float = HTTP_REQUEST_TIMEOUT,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        derp_enabled: bool = True,
        home: str = "",
        admission: AdmissionPolicy | None = None,
        rate_limits: RateLimits | None = None,
        rate_config_path: str = "",
        accept_connection_limit: float = math.inf,
        accept_connection_burst: int = sys.maxsize,
        sibling_secret: bytes | None = None,
        idle_spin: float = IDLE_SPIN_SECONDS,
    ) -> None:
        """``admission``: checks for non-mesh clients (None: everyone is admitted).
        ``rate_limits``: per-client receive limits (None: off); ``rate_config_path`` is the file
        :meth:`reload` re-reads. ``accept_connection_limit``/``_burst``: connections per second
        (and burst) accepted on TLS listeners; +inf = no limit. ``sibling_secret``: set on the
        workers of a ``-workers`` group, the secret their links present as mesh key.
        ``idle_spin``: seconds to poll the client sockets before sleeping while traffic is
        interactive (:class:`~relay._transport.IdleSpin`); 0 turns it off."""
        self.idle_spin = idle_spin
        self.private_key = private_key
        self.public_key = private_key.public
        self.mesh_key = mesh_key
        self.hostname = hostname
        self.write_timeout = write_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_jitter = keepalive_jitter
        # Each of the two DERP handshake stages (ServerKey out, ClientInfo in) gets this long.
        self.handshake_timeout = handshake_timeout
        self.http_timeout = http_timeout
        self.queue_depth = queue_depth
        self.derp_enabled = derp_enabled
        self.home = home
        self.stats = RelayStats()
        self.table = RoutingTable(self.stats)
        self.admission = admission if admission is not None and admission.enabled else None
        self.rate_config_path = rate_config_path
        # Read by every client reader at every socket read: None = no rate limiting.
        self.rate_limits: RateLimits | None = None
        self.set_rate_limits(rate_limits)
        self.accept_connection_limit = accept_connection_limit
        self.accept_connection_burst = accept_connection_burst
        self.sibling_secret = sibling_secret
        self.worker_links = WorkerLinkStats()
        self._server_key_frame = ServerKey(self.public_key.raw).encode()
        self._upgrade_response = (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: DERP\r\n"
            b"Connection: Upgrade\r\n"
            b"Derp-Version: 2\r\n"
            b"Derp-Public-Key: " + self.public_key.hex().encode() + b"\r\n\r\n"
        )
        self._conn_scopes: set[trio.CancelScope] = set()  # one per live connection
        self._shutting_down = False
        self._listen_socks: set[trio.socket.SocketType] = set()
        self._accepting_stopped = False
        self._idle_spin: IdleSpin | None = None  # created, and added to trio, with the first connection

    # -- configuration ---------------------------------------------------------------------------

    def set_rate_limits(self, limits: RateLimits | None) -> None:
        """Apply per-client rate limits (None: off); live connections pick them up at once."""
        self.rate_limits = limits
        self.stats.rate_limit_bytes_per_second = limits.bytes_per_sec if limits else 0.0
        self.stats.rate_limit_burst_bytes = limits.burst if limits else 0.0

    def reload(self) -> bool:
        """SIGHUP: re-read the allow file and the rate config. A bad file keeps the old settings.

        Logs what happened; returns False if anything failed to load.
        """
        ok = True
        if self.admission is not None and self.admission.allow_file:
            try:
                log.info("reloaded %s", self.admission.reload())
            except AllowListError as e:
                ok = False
                log.error("allow file not reloaded, keeping the old list: %s", e)
        if self.rate_config_path:
            try:
                limits = load_rate_config(self.rate_config_path)
            except RateConfigError as e:
                ok = False
                log.error("rate config not reloaded, keeping the old limits: %s", e)
            else:
                self.set_rate_limits(limits)
                if limits is None:
                    log.info("reloaded rate config %s: rate limiting off", self.rate_config_path)
                else:
                    log.info(
                        "reloaded rate config %s: %g bytes/s per client, burst %g bytes",
                        self.rate_config_path,
                        limits.bytes_per_sec,
                        limits.burst,
                    )
        return ok

    # -- listeners -------------------------------------------------------------------------------

    async def serve_tcp(
        self,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        http_side_listener: bool = False,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (``None``/``""``: every address) until cancelled.

        ``task_status.started`` reports the bound addresses, so port 0 works in tests.
        Cancelling this task also closes the connections it accepted. To stop accepting but let
        connections drain (graceful restart), call :meth:`stop_accepting`: this task then returns
        when the last of them has ended.
        """
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        await self.serve_sockets(
            [lst.socket for lst in listeners],
            ssl_context=ssl_context,
            http_side_listener=http_side_listener,
            task_status=task_status,
        )

    async def serve_sockets(
        self,
        socks: Sequence[trio.socket.SocketType],
        *,
        ssl_context: ssl.SSLContext | None = None,
        http_side_listener: bool = False,
        sibling_listener: bool = False,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Like :meth:`serve_tcp`, on listening sockets made elsewhere (a ``-workers`` supervisor).

        ``sibling_listener``: the private endpoint of a worker, where only sibling links are
        admitted. The sockets are closed when this returns.
        """
        bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in socks]
        cfg = RouteConfig(
            derp_enabled=self.derp_enabled,
            home=self.home,
            is_tls=ssl_context is not None,
            http_side_listener=http_side_listener,
        )
        # One accept limiter per TLS listener, shared by its sockets (IPv4 and IPv6).
        limiter: ConnectionLimiter | None = None
        if ssl_context is not None and self.accept_connection_limit != math.inf:
            limiter = ConnectionLimiter(
                self.accept_connection_limit, self.accept_connection_burst, trio.current_time()
            )
        try:
            async with trio.open_nursery() as nursery:
                for s in socks:
                    nursery.start_soon(self._accept_loop, s, ssl_context, cfg, limiter, sibling_listener)
                task_status.started(bound)
        finally:
            for s in socks:
                s.close()

    async def _accept_loop(
        self,
        listen_sock: trio.socket.SocketType,
        ssl_context: ssl.SSLContext | None,
        cfg: RouteConfig,
        limiter: ConnectionLimiter | None = None,
        sibling_listener: bool = False,
    ) -> None:
        self._listen_socks.add(listen_sock)
        async with trio.open_nursery() as handlers:
            while not self._accepting_stopped:
                try:
                    sock, addr = await listen_sock.accept()
                except trio.ClosedResourceError:
                    break  # stop_accepting(): connections already accepted live on
                except OSError as e:
                    if e.errno == errno.EBADF:  # closed by stop_accepting() between two accepts
                        break
                    if e.errno in _ACCEPT_RETRY_ERRNOS:
                        log.error("accept failed (%s); retrying in 100 ms", e)
                        await trio.sleep(0.1)
                        continue
                    raise
                if ssl_context is not None:
                    # derper's tls_listener: over the limit, accept and close at once.
                    if limiter is not None and not limiter.allow(trio.current_time()):
                        self.stats.tls_listener_rejected += 1
                        sock.close()
                        continue
                    self.stats.tls_listener_accepted += 1
                if not sibling_listener:  # sibling links are not clients
                    self.stats.accepts += 1
                handlers.start_soon(self._handle_connection, sock, addr, ssl_context, cfg, sibling_listener)

    def stop_accepting(self) -> None:
        """Close the listening sockets; connections already accepted are not affected."""
        self._accepting_stopped = True
        for s in self._listen_socks:
            s.close()
        self._listen_socks.clear()

    def announce_restart(self, reconnect_in: float, try_for: float) -> int:
        """Send Restarting to every client (graceful restart); return how many were told.

        The frame says: this relay is going away; reconnect in ``reconnect_in`` seconds and keep
        trying for ``try_for`` seconds. derper defines the frame but never sends it.
        """
        frame = Restarting(int(reconnect_in * 1000), int(try_for * 1000)).encode()
        told = 0
        for cs in list(self.table.sets.values()):
            for conn in cs.conns:
                conn.queue_control(frame)
                told += 1
        return told

    def close_all_connections(self) -> None:
        """Close every client connection now, and any accepted later (shutdown)."""
        self._shutting_down = True
        for scope in self._conn_scopes:
            scope.cancel()

    # -- one connection --------------------------------------------------------------------------

    async def _handle_connection(
        self,
        sock: trio.socket.SocketType,
        addr: Sequence[object],
        ssl_context: ssl.SSLContext | None,
        cfg: RouteConfig,
        sibling_listener: bool = False,
    ) -> None:
        remote = (str(addr[0]), int(addr[1]))  # type: ignore[call-overload]
        configure_accepted_socket(sock)
        transport: Transport | None = None
        scope = trio.CancelScope()
        if self._shutting_down:
            scope.cancel()
        self._conn_scopes.add(scope)
        try:
            with scope:
                spin = self._idle_spinner()
                if ssl_context is not None:
                    tls = TLSTransport(sock, ssl_context, idle_spin=spin)
                    transport = tls
                    try:
                        with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                            await tls.handshake()
                    except (trio.TooSlowError, ssl.SSLError, OSError, trio.BrokenResourceError) as e:
                        self.stats.tls_handshake_errors += 1
                        log.debug("TLS handshake with %s failed: %r", remote, e)
                        return
                    self.stats.tls_versions[tls.tls_version or "unknown"] += 1
                else:
                    transport = SocketTransport(sock, idle_spin=spin)
                await self._serve_http(transport, remote, cfg, sibling_listener)
        except ProtocolError as e:
            self.stats.protocol_errors[e.reason] += 1
            log.info("connection from %s closed: %s", remote[0], e)
        except trio.TooSlowError:
            self.stats.handshake_timeouts += 1
            log.info("connection from %s timed out before the handshake finished", remote[0])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("connection from %s ended: %r", remote[0], e)
        except Exception:
            # Nothing a client sends may take the server down: log it and drop this connection.
            self.stats.protocol_errors["internal_error"] += 1
            log.exception("unexpected error serving %s", remote[0])
        finally:
            self._conn_scopes.discard(scope)
            if transport is None:
                sock.close()
            else:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await transport.aclose()
                    except Exception:
                        sock.close()

    @property
    def idle_spin_counts(self) -> tuple[int, int]:
        """(spins, spins ended by data) of this server's :class:`IdleSpin` so far."""
        spin = self._idle_spin
        return (spin.spins, spin.spins_ended_by_data) if spin is not None else (0, 0)

    def _idle_spinner(self) -> IdleSpin | None:
        """This server's :class:`IdleSpin`, added to the running trio loop on first use (None: off)."""
        if self.idle_spin <= 0:
            return None
        if self._idle_spin is None:
            self._idle_spin = IdleSpin(self.idle_spin)
            trio.lowlevel.add_instrument(self._idle_spin)
        return self._idle_spin

    async def _serve_http(
        self, transport: Transport, remote: tuple[str, int], cfg: RouteConfig, sibling_listener: bool = False
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HTTP_HEADER)
        buf = bytearray(16 << 10)
        mv = memoryview(buf)
        while True:
            with trio.fail_after(self.http_timeout):
                request: h11.Request | None = None
                body_len = 0
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError as e:
                        await self._send_error(transport, conn, e.error_status_hint, str(e))
                        raise ProtocolError("bad_http_request", f"bad HTTP request: {e}") from None
                    if event is h11.NEED_DATA:
                        n = await transport.receive_into(mv)
                        if n == 0 and request is None and conn.their_state is h11.IDLE:
                            return  # the client closed an idle keep-alive connection
                        conn.receive_data(bytes(mv[:n]))
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body_len += len(event.data)
                        if body_len > MAX_HTTP_BODY:
                            await self._send_error(transport, conn, 413, "request body too large")
                            raise ProtocolError("http_body_too_large", "HTTP request body too large")
                    elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
            assert request is not None
            headers = [(k.lower(), v) for k, v in request.headers.raw_items()]
            decision = route(request.method, request.target, headers, cfg)
            if isinstance(decision, Reply):
                self.stats.http_requests[(decision.route, decision.status)] += 1
                await self._send_reply(transport, conn, request.method, decision)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
                continue
            trailing, _closed = conn.trailing_data
            # The connection may live for days from here: drop the HTTP parser and its buffer.
            del conn, buf, mv
            if isinstance(decision, WebSocketUpgrade):
                self.stats.http_requests[("derp_websocket", 101)] += 1
                self.stats.websocket_accepts += 1
                ws = await accept_websocket(transport, headers, request.target, bytes(trailing))
                await self._serve_derp(
                    ws, remote, b"", send_101=False, ideal_node=None, sibling_listener=sibling_listener
                )
            else:
                assert isinstance(decision, DerpUpgrade)
                self.stats.http_requests[("derp", 101)] += 1
                await self._serve_derp(
                    transport,
                    remote,
                    bytes(trailing),
                    send_101=not decision.fast_start,
                    ideal_node=decision.ideal_node,
                    sibling_listener=sibling_listener,
                )
            return

    async def _send_reply(
        self, transport: Transport, conn: h11.Connection, method: bytes, reply: Reply
    ) -> None:
        headers = [*reply.headers, (b"Content-Length", str(len(reply.body)).encode())]
        if not any(k.lower() == b"content-type" for k, _ in headers) and reply.body:
            headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
        response = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        out = conn.send(response) or b""
        if reply.body and method != b"HEAD":
            out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await transport.send_all(out)

    async def _send_error(self, transport: Transport, conn: h11.Connection, status: int, text: str) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = (text + "\n").encode()
        try:
            out = (
                conn.send(
                    h11.Response(
                        status_code=status,
                        reason=_reason(status),
                        headers=[
                            (b"Content-Type", b"text/plain; charset=utf-8"),
                            (b"Content-Length", str(len(body)).encode()),
                            (b"Connection", b"close"),
                        ],
                    )
                )
                or b""
            )
            out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        with trio.move_on_after(2):
            await transport.send_all(out)
            # Lingering close: swallow what the client is still sending (bounded), so closing
            # with unread data does not reset the connection and destroy the response.
            drained, scratch = 0, memoryview(bytearray(16 << 10))
            while drained < MAX_HTTP_BODY:
                n = await transport.receive_into(scratch)
                if n == 0:
                    break
                drained += n

    # -- DERP handshake --------------------------------------------------------------------------

    async def _serve_derp(
        self,
        transport: Transport,
        remote: tuple[str, int],
        trailing: bytes,
        *,
        send_101: bool,
        ideal_node: str | None,
        sibling_listener: bool = False,
    ) -> None:
        with trio.fail_after(self.handshake_timeout):
            await transport.send_all(
                self._upgrade_response + self._server_key_frame if send_101 else self._server_key_frame
            )
        decoder = FrameDecoder(max_frame_len=CLIENT_INFO_MAX_LEN)
        decoder.feed(trailing)
        buf = bytearray(64 << 10)
        with trio.fail_after(self.handshake_timeout):
            while True:
                try:
                    item = decoder.next_frame()
                except ProtocolError as e:
                    raise HandshakeError("client_info_too_large", str(e)) from None
                if item is not None:
                    break
                n = await transport.receive_into(memoryview(buf))
                if n == 0:
                    raise HandshakeError("eof_before_client_info", "connection closed before ClientInfo")
                decoder.feed(memoryview(buf)[:n])
            frame_type, payload = item
            del buf  # keep only the per-client reader's buffer alive during the session
            if frame_type != FrameType.CLIENT_INFO:
                raise HandshakeError("expected_client_info", f"first frame is type {frame_type:#04x}")
            if len(payload) < CLIENT_INFO_MIN_LEN:
                raise HandshakeError("short_client_info", f"ClientInfo of {len(payload)} bytes")
            client_key, info = open_client_info(self.private_key, payload)
            # The private endpoint of a worker admits sibling links only, nothing else.
            if sibling_listener and not info.has_mesh_key(self.sibling_secret):
                self.stats.rejected_clients["not_a_sibling"] += 1
                log.warning("private worker endpoint: refused %s (not a sibling worker)", remote[0])
                return
            is_mesh_peer = sibling_listener or info.has_mesh_key(self.mesh_key)
            # Admission, inside the ClientInfo budget (spec §3, §5). Mesh peers always pass.
            if self.admission is not None and not is_mesh_peer:
                decision = await self.admission.check(client_key.raw, remote[0])
                if decision.url_result is not None:
                    self.stats.admission[decision.url_result] += 1
                if decision.reject is not None:
                    self.stats.rejected_clients[decision.reject] += 1
                    log.info("client %s rejected: %s", client_key.text(), decision.detail or decision.reject)
                    return  # closed silently, no ServerInfo (as derper)
        not_ideal = ideal_node is not None and ideal_node != self.hostname
        transport.enable_idle_spin()  # a DERP client now: its packets are worth a short spin
        conn = ClientConn(
            self,
            transport,
            client_key.raw,
            info,
            is_mesh_peer=is_mesh_peer,
            remote=remote,
            not_ideal=not_ideal,
            initial_data=decoder.take_buffered(),
        )
        if sibling_listener:
            self.table.add_sibling_link(conn)
        else:
            self.table.register(conn)
        try:
            sealed = seal_server_info(self.private_key, client_key.raw, ServerInfo())
            with trio.fail_after(max(self.write_timeout, 1.0) if self.write_timeout else math.inf):
                await transport.send_all(ServerInfoFrame(sealed).encode())
        except BaseException:
            conn.closing = True
            self.table.unregister(conn)
            raise
        log.debug("client %s connected from %s (mesh=%s)", client_key.short(), remote[0], is_mesh_peer)
        await conn.run()

    # -- mesh hooks used by ClientConn -----------------------------------------------------------

    def receive_forwarded(self, via: ClientConn, payload: bytes) -> None:
        """A ForwardPacket from a mesh peer: deliver locally, never forward again."""
        src, dst, packet = payload[:KEY_LEN], payload[KEY_LEN : 2 * KEY_LEN], payload[2 * KEY_LEN :]
        disco = is_disco_packet(packet)
        from_sibling = via in self.table.sibling_links
        if from_sibling:
            self.worker_links.forwarded_in += 1
        else:
            self.stats.packets_forwarded_in += 1
        conn = self.table.active.get(dst)
        if conn is None:
            # From another relay, for a client of a sibling worker: one more (loopback) hop.
            # From a sibling: never forwarded again, so no packet can loop.
            sibling = None if from_sibling else self.table.sibling_forwarder_for(dst)
            if sibling is not None:
                sibling.forward(src, dst, packet)
                return
            self.stats.drop("unknown_dest_on_fwd", disco, 1, len(packet))
            if disco:
                via.queue_peer_gone(dst, PeerGoneReason.NOT_HERE)
            return
        frame = b"\x05" + (KEY_LEN + len(packet)).to_bytes(4, "big") + src + packet
        conn.enqueue(QueueEntry(frame, 1, len(packet), src, trio.current_time()), disco)

    def receive_sibling_run(self, body: memoryview) -> None:
        """A SiblingRun from a sibling worker (``_mesh``): its frames go to ``dst`` as they are.

        Never forwarded again. The sibling built the frames from a client's SendPackets it had
        already checked; only our own authenticated siblings can send this frame.
        """
        dst, src = bytes(body[:KEY_LEN]), bytes(body[KEY_LEN : 2 * KEY_LEN])
        packets, nbytes = _RUN_COUNTS.unpack_from(body, 2 * KEY_LEN)
        self.worker_links.forwarded_in += packets
        conn = self.table.active.get(dst)
        if conn is None:
            self.stats.drop("unknown_dest_on_fwd", False, packets, nbytes)
            return
        frames = bytes(body[SIBLING_RUN_HEADER_LEN:])
        conn.enqueue(QueueEntry(frames, packets, nbytes, src, trio.current_time()), False)

    def close_peer(self, key: bytes, via: ClientConn | None = None) -> None:
        """ClosePeer from a mesh peer: close every connection of ``key``.

        From another relay, sibling workers that have ``key`` are told too (one hop, like packets).
        """
        conns = self.table.connections_of(key)
        siblings = []
        if via is None or via not in self.table.sibling_links:
            siblings = [p for p in self.table.forwarders.get(key, ()) if p.is_sibling]
        for peer in siblings:
            peer.forward_close_peer(key)
        if not conns and not siblings:
            log.info("ClosePeer for unknown key %s", key.hex()[:8])
        for c in conns:
            c.close("closed by mesh peer (ClosePeer)")
