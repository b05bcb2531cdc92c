"""One relay client connection after its handshake: one reader task, one writer task.

The reader never blocks on anyone else. It reads up to 64 KiB at a time into a reused buffer and
walks the frames in place: a SendPacket becomes a RecvPacket by rewriting its type byte and
replacing the destination key with the sender's key, so back-to-back packets to the same
destination are handed over with a single copy. Delivery is a non-blocking put into the
destination's queue (see ``_queue``); a stalled receiver loses its own oldest packets and slows
nobody else.

The writer owns the transport's send side. It wakes when anything is queued, drains everything
pending into one buffer, and writes it with one ``send_all`` under the write timeout (2 s by
default, 30 s for mesh peers). A timeout or write error closes the connection.

A run of packets for a client of a *sibling worker* (``-workers``, see ``_workers``) is rewritten
the same way and handed to the link to that worker as one private SiblingRun frame (destination,
source, counts, then the RecvPacket frames as they will be written), so the hop between workers
costs one copy per run, not per packet; the sibling enqueues the frames as they are.

Cancellation: :meth:`ClientConn.run` returns when either task ends; the other is cancelled, the
connection is unregistered (peers and watchers hear PeerGone) and queued packets are counted as
``gone_disconnected``.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import trio

from natlib.derp import (
    FRAME_HEADER_LEN,
    KEY_LEN,
    MAX_PACKET_SIZE,
    PING_MAX_LEN,
    ClientInfo,
    FrameError,
    FrameType,
    KeepAlive,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    PeerPresentFlags,
    ProtocolError,
    TokenBucket,
)

from ._mesh import SIBLING_RUN, SIBLING_RUN_HEADER_LEN, SIBLING_RUN_MAX_LEN
from ._queue import PacketQueue, QueueEntry
from ._ratelimit import ByteBucket
from ._transport import Transport

if TYPE_CHECKING:
    from ._mesh import MeshPeer
    from ._server import RelayServer

__all__ = ["ClientConn"]

log = logging.getLogger(__name__)

READ_BUFFER_SIZE: Final = 256 << 10
SMALL_READ_BUFFER_SIZE: Final = 16 << 10
_MIN_READ: Final = 4 << 10  # compact a small buffer when less room than this is left
_READ_CHUNK: Final = 64 << 10
# Keep room for one maximal frame after the unparsed tail before reading again.
_MAX_HANDLED_FRAME: Final = FRAME_HEADER_LEN + 2 * KEY_LEN + MAX_PACKET_SIZE
KEEPALIVE_JITTER: Final = 5.0
MESH_WRITE_TIMEOUT: Final = 30.0
NOT_HERE_RATE: Final = 1.0
NOT_HERE_BURST: Final = 3.0
HOME_MOVE_GRACE: Final = 5.0

_HDR = struct.Struct(">BI")
_LEN = struct.Struct(">I")
_DISCO_MAGIC: Final = "TS💬".encode()
_DISCO_MIN: Final = len(_DISCO_MAGIC) + KEY_LEN + 24  # magic + disco key + nonce
_DISCO_MIN_SEND_LEN: Final = KEY_LEN + _DISCO_MIN  # a SendPacket frame length that can hold disco
_KEEPALIVE_FRAME: Final = KeepAlive().encode()
_T_SEND: Final = FrameType.SEND_PACKET.value
_T_RECV: Final = FrameType.RECV_PACKET.value


class _SiblingRunTarget:
    """A run's destination on a sibling worker: looks like a connection to :meth:`ClientConn._flush_run`."""

    __slots__ = ("dst", "peer")

    def __init__(self, peer: MeshPeer, dst: bytes) -> None:
        self.peer = peer
        self.dst = dst

    def enqueue(self, entry: QueueEntry, disco: bool) -> None:
        self.peer.forward_run(self.dst, entry)


def _pending_frame_len(buf: bytearray, start: int, end: int) -> int:
    """Total length of the incomplete frame at ``start`` (5 until its header is complete)."""
    if end - start < FRAME_HEADER_LEN:
        return FRAME_HEADER_LEN
    length: int = _LEN.unpack_from(buf, start + 1)[0]
    return FRAME_HEADER_LEN + length


class ClientConn:
    """A registered DERP client. Created by the server after a successful handshake."""

    def __init__(
        self,
        server: RelayServer,
        transport: Transport,
        key: bytes,
        info: ClientInfo,
        *,
        is_mesh_peer: bool,
        remote: tuple[str, int],
        not_ideal: bool = False,
        initial_data: bytes = b"",
    ) -> None:
        self.server = server
        self.table = server.table
        self.stats = server.stats
        self.transport = transport
        self.key = key
        self.info = info
        self.is_mesh_peer = is_mesh_peer
        self.remote = remote
        self.not_ideal = not_ideal
        self._clock = trio.lowlevel.current_clock()  # its current_time() is trio.current_time(), in one call
        self.connected_at = self._clock.current_time()
        self.is_home = False
        self.closing = False
        self.received_from: set[bytes] = set()
        self._initial = initial_data
        self._send_queue = PacketQueue(server.queue_depth)
        self._disco_queue = PacketQueue(server.queue_depth)
        self._control: list[bytes] = []
        self._pending_pong: bytes | None = None
        self._wake = trio.Event()
        self._writer_idle = False  # the writer waits for work: enqueue may write directly
        self._unfinished: tuple[QueueEntry, bool] | None = None  # written in part by enqueue
        self._not_here_bucket = TokenBucket(NOT_HERE_RATE, NOT_HERE_BURST, trio.current_time())
        self._discard = 0  # bytes of an ignored frame still to skip
        self._rate_bucket: ByteBucket | None = None  # created at the first rate-limited read
        self._fed_sibling: MeshPeer | None = None  # the sibling link the last read's runs went to
        self._cancel = trio.CancelScope()
        self.write_timeout = MESH_WRITE_TIMEOUT if is_mesh_peer else server.write_timeout
        self.close_reason = ""

    def __repr__(self) -> str:
        return f"<ClientConn {self.key.hex()[:8]} from {self.remote[0]}:{self.remote[1]}>"

    @property
    def peer_present_flags(self) -> int:
        flags = 0
        if self.is_mesh_peer:
            flags |= PeerPresentFlags.IS_MESH_PEER
        if self.info.is_prober:
            flags |= PeerPresentFlags.IS_PROBER
        if self.not_ideal:
            flags |= PeerPresentFlags.NOT_IDEAL
        return flags or PeerPresentFlags.IS_REGULAR

    # -- called by other connections and the routing table (never block) -------------------------

    def enqueue(self, entry: QueueEntry, disco: bool) -> None:
        if self.closing:
            self.stats.drop("gone_disconnected", disco, entry.packets, entry.payload_bytes)
            return
        # _writer_idle: the writer waits with nothing pending (whatever queues work clears it).
        if self._writer_idle and self.transport.send_nowait(entry.frames):
            # Fast path: the writer has nothing to do, so write from here and save a task switch
            # per packet (the latency of an interactive exchange). Backlog goes to the writer.
            if entry.src not in self.received_from:
                self.table.note_delivered(self, entry.src)
            stats = self.stats
            stats.average_queue_duration_ms *= 0.9  # note_queue_delay(0.0), inlined: hot path
            if self.transport.has_backlog:  # the writer finishes it, then counts it sent or dropped
                self._unfinished = (entry, disco)
                self._wake_writer()
            else:
                stats.packets_sent += entry.packets
                stats.bytes_sent += entry.payload_bytes
            return
        q = self._disco_queue if disco else self._send_queue
        for old in q.put(entry):
            self.stats.drop("queue_head", disco, old.packets, old.payload_bytes)
        self._writer_idle = False  # _wake_writer(), inlined: hot path
        self._wake.set()

    def _wake_writer(self) -> None:
        """Work is queued: wake the writer, and stop :meth:`enqueue` writing past it."""
        self._writer_idle = False
        self._wake.set()

    def queue_control(self, frame: bytes) -> None:
        """Queue an encoded control frame (written before queued packets)."""
        if self.closing:
            return
        self._control.append(frame)
        self._wake_writer()

    def queue_peer_gone(self, key: bytes, reason: int) -> None:
        if self.closing:
            return
        self._control.append(PeerGone(key, reason).encode())
        if reason == PeerGoneReason.DISCONNECTED:
            self.stats.peer_gone_disconnected_frames += 1
        else:
            self.stats.peer_gone_not_here_frames += 1
        self._wake_writer()

    def queue_peer_present(self, conn: ClientConn) -> None:
        if self.closing:
            return
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
                conn.remote[0].split("%", 1)[0]
            )
        except ValueError:
            ip = None
        frame = PeerPresent(conn.key, ip, conn.remote[1] if ip is not None else 0, conn.peer_present_flags)
        self._control.append(frame.encode())
        self._wake_writer()

    def close(self, reason: str) -> None:
        """Ask this connection to end (from any task). Idempotent."""
        if not self.close_reason:
            self.close_reason = reason
        self._cancel.cancel()

    # -- lifetime --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until EOF, an error, or :meth:`close`; always cleans up."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guarded, self._write_loop, nursery.cancel_scope)
                    await self._guarded(self._read_loop, nursery.cancel_scope)
        finally:
            self.closing = True
            self.table.unregister(self)
            for q, disco in ((self._send_queue, False), (self._disco_queue, True)):
                for e in q.take_all():
                    self.stats.drop("gone_disconnected", disco, e.packets, e.payload_bytes)
            log.debug("client %s gone: %s", self.key.hex()[:8], self.close_reason or "eof")

    async def _guarded(self, loop: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run the reader or the writer; when it ends for any reason, end the other one too."""
        try:
            await loop()
        except ProtocolError as e:
            self.stats.protocol_errors[e.reason] += 1
            self.close_reason = self.close_reason or f"protocol error: {e}"
            log.info("client %s closed: %s", self.key.hex()[:8], e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.close_reason = self.close_reason or f"transport error: {e}"
        finally:
            scope.cancel()

    # -- reader ----------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        # An idle or chatty client gets a small buffer; one that streams (a read fills the whole
        # window) or sends a frame larger than it gets the big one, for batching. This keeps an
        # idle connection cheap (derper: ~36 KiB each) without slowing bulk transfers.
        buf = bytearray(max(SMALL_READ_BUFFER_SIZE, len(self._initial)))
        mv = memoryview(buf)
        big = len(buf) >= READ_BUFFER_SIZE
        end = len(self._initial)
        buf[:end] = self._initial
        self._initial = b""
        start = 0
        filled = False
        active = self.table.active
        server = self.server
        exempt = self.is_mesh_peer
        while True:
            if end > start:
                if active.get(self.key) is not self:
                    self.table.note_activity(self)
                start = self._process(buf, mv, start, end)
            fed = self._fed_sibling
            if fed is not None:
                # This client's packets go to a sibling worker that is behind: read no more until
                # that link drains (clients of this worker only are unaffected).
                self._fed_sibling = None
                if not fed.drained.is_set():
                    await fed.drained.wait()
            if start == end:
                start = end = 0
            need = 0 if start == end else _pending_frame_len(buf, start, end)
            if not big and (filled or need > len(buf)):
                grown = bytearray(READ_BUFFER_SIZE)
                grown[: end - start] = mv[start:end]
                buf, mv, big = grown, memoryview(grown), True
                end -= start
                start = 0
            elif start and len(buf) - start < (_MAX_HANDLED_FRAME if big else max(need, _MIN_READ)):
                buf[: end - start] = mv[start:end]
                end -= start
                start = 0
            window = mv[end : min(len(buf), end + _READ_CHUNK)]
            n = await self.transport.receive_into(window)
            if n == 0:
                self.close_reason = self.close_reason or "eof"
                return
            filled = n == len(window)
            # -rate-config: charge this read before handling it (one check per read when off).
            if server.rate_limits is not None and not exempt:
                await self._rate_limit_wait(n)
            end += n

    async def _rate_limit_wait(self, n: int) -> None:
        """Charge ``n`` received bytes to this client's bucket; sleep if it is in debt.

        Reads pause meanwhile, so TCP backpressure slows the sender and nothing is dropped. The
        limits are read from the server at every read, so a SIGHUP reload applies at once.
        """
        limits = self.server.rate_limits
        if limits is None:
            return
        now = trio.current_time()
        bucket = self._rate_bucket
        if bucket is None:
            bucket = self._rate_bucket = ByteBucket(limits, now)
        elif bucket.limits is not limits:
            bucket.update(limits)
        delay = bucket.take(min(n, bucket.burst), now)
        if delay > 0:
            stats = self.stats
            stats.rate_limit_waits += 1
            stats.rate_limit_wait_seconds += delay
            await trio.sleep(delay)

    def _process(self, buf: bytearray, mv: memoryview, pos: int, end: int) -> int:
        """Handle every complete frame in ``buf[pos:end]``; return where the unparsed tail starts.

        This is the relay's hot loop, kept to a handful of operations per packet: a run of
        SendPackets to one destination costs one header unpack, one key comparison and one
        in-place key patch per packet, and a single copy per run. Counters are updated per run.
        """
        if self._discard:
            skip = min(self._discard, end - pos)
            self._discard -= skip
            pos += skip
        active = self.table.active
        mykey = self.key
        unpack_hdr = _HDR.unpack_from
        t_send, t_recv, disco_first, disco_len = _T_SEND, _T_RECV, _DISCO_MAGIC[0], _DISCO_MIN_SEND_LEN
        disco_magic = _DISCO_MAGIC
        max_send = KEY_LEN + MAX_PACKET_SIZE
        stats = self.stats
        # The current run: consecutive SendPackets of one length to one destination. Its frames all
        # start with the same 37 bytes (header + destination key), so one startswith() checks
        # type, length and destination of the next frame at once; the run is handed over with
        # one copy.
        run_conn: ClientConn | _SiblingRunTarget | None = None
        run_prefix = b""
        run_flen = 0
        run_maybe_disco = False
        run_start = run_end = run_count = 0
        while end - pos >= 5:
            if run_conn is not None and buf.startswith(run_prefix, pos):
                fend = pos + run_flen
                if fend > end:
                    break
                # Only a real disco packet ends the run; a payload that merely starts with the
                # magic's first byte (0x54) must not cost a run (and a write) per packet.
                if not (
                    run_maybe_disco and buf[pos + 37] == disco_first and buf.startswith(disco_magic, pos + 37)
                ):
                    buf[pos] = t_recv
                    buf[pos + 5 : pos + 37] = mykey
                    run_end = fend
                    run_count += 1
                    pos = fend
                    continue
            t, n = unpack_hdr(buf, pos)
            if t == t_send:
                if not 32 <= n <= max_send:
                    raise FrameError("bad_send_packet_len", f"SendPacket of {n} bytes")
                fend = pos + 5 + n
                if fend > end:
                    break
                if run_conn is not None:
                    self._flush_run(run_conn, mv, run_start, run_end, run_count)
                    run_conn = None
                if n >= disco_len and buf[pos + 37] == disco_first and buf.startswith(_DISCO_MAGIC, pos + 37):
                    self._deliver_disco(buf, mv, pos, fend, n - 32)
                    pos = fend
                    continue
                dst = bytes(mv[pos + 5 : pos + 37])
                conn: ClientConn | _SiblingRunTarget | None = active.get(dst)
                if conn is None:
                    sibling = self.table.sibling_forwarder_for(dst)
                    if sibling is not None:
                        conn = _SiblingRunTarget(sibling, dst)
                if conn is None:
                    stats.packets_received += 1
                    stats.bytes_received += n - 32
                    self._not_local(dst, False, mv, pos, fend)
                else:
                    run_prefix = bytes(mv[pos : pos + 37])
                    run_flen, run_maybe_disco = 5 + n, n >= disco_len
                    buf[pos] = t_recv
                    buf[pos + 5 : pos + 37] = mykey
                    run_conn = conn
                    run_start, run_end, run_count = pos, fend, 1
                pos = fend
                continue
            # Anything but SendPacket: the slow path.
            if run_conn is not None:
                self._flush_run(run_conn, mv, run_start, run_end, run_count)
                run_conn = None
            consumed = self._handle_other(t, n, mv, pos, end)
            if consumed == 0:
                break
            pos += consumed
        if run_conn is not None:
            self._flush_run(run_conn, mv, run_start, run_end, run_count)
        return pos

    def _flush_run(
        self, conn: ClientConn | _SiblingRunTarget, mv: memoryview, start: int, end: int, count: int
    ) -> None:
        """Hand a run of rewritten frames to ``conn``'s queue with one copy, and count it."""
        payload = end - start - count * (FRAME_HEADER_LEN + KEY_LEN)
        if type(conn) is _SiblingRunTarget:
            self._fed_sibling = conn.peer
        stats = self.stats
        stats.packets_received += count
        stats.bytes_received += payload
        entry = QueueEntry(bytes(mv[start:end]), count, payload, self.key, self._clock.current_time())
        conn.enqueue(entry, False)

    def _deliver_disco(self, buf: bytearray, mv: memoryview, pos: int, fend: int, plen: int) -> None:
        stats = self.stats
        stats.packets_received += 1
        stats.packets_received_disco += 1
        stats.bytes_received += plen
        dst = bytes(mv[pos + 5 : pos + 37])
        conn = self.table.active.get(dst)
        if conn is None:
            self._not_local(dst, True, mv, pos, fend)
            return
        buf[pos] = _T_RECV
        mv[pos + 5 : pos + 37] = self.key
        conn.enqueue(QueueEntry(bytes(mv[pos:fend]), 1, plen, self.key, self._clock.current_time()), True)

    def _not_local(self, dst: bytes, disco: bool, mv: memoryview, pos: int, fend: int) -> None:
        """``dst`` has no active connection here: forward it through the mesh, or drop it."""
        fwd = self.table.forwarder_for(dst)
        if fwd is not None:
            fwd.forward(self.key, dst, bytes(mv[pos + 37 : fend]))
            return
        reason = self.table.drop_reason(dst)
        self.stats.drop(reason, disco, 1, fend - pos - 37)
        if disco and reason == "unknown_dest" and self._not_here_bucket.try_take(1, trio.current_time()):
            self.queue_peer_gone(dst, PeerGoneReason.NOT_HERE)

    def _handle_other(self, t: int, n: int, mv: memoryview, pos: int, end: int) -> int:
        """Handle one non-SendPacket frame at ``pos``; return bytes consumed (0 = need more)."""
        body = pos + FRAME_HEADER_LEN
        if t == FrameType.NOTE_PREFERRED:
            if n != 1:
                raise FrameError("bad_note_preferred_len", f"NotePreferred of {n} bytes")
            if end < body + 1:
                return 0
            self._note_preferred(mv[body] != 0)
        elif t == FrameType.PING:
            if n < 8 or n > PING_MAX_LEN:
                raise FrameError("bad_ping_len", f"Ping of {n} bytes")
            if end < body + n:
                return 0
            self.stats.got_ping += 1
            if self._pending_pong is None:  # one pending Pong; later Pings are ignored
                self._pending_pong = bytes(mv[body : body + 8])
                self._wake_writer()
        elif t == SIBLING_RUN and self in self.table.sibling_links:
            if not SIBLING_RUN_HEADER_LEN <= n <= SIBLING_RUN_MAX_LEN:
                raise FrameError("bad_sibling_run_len", f"SiblingRun of {n} bytes")
            if end < body + n:
                return 0
            self.server.receive_sibling_run(mv[body : body + n])
        elif t in (FrameType.WATCH_CONNS, FrameType.CLOSE_PEER, FrameType.FORWARD_PACKET):
            if not self.is_mesh_peer:
                raise ProtocolError("insufficient_permissions", f"mesh frame {t:#04x} from a non-mesh client")
            if t == FrameType.WATCH_CONNS:
                if n != 0:
                    raise FrameError("bad_watch_conns_len", f"WatchConns of {n} bytes")
                if self.key == self.server.public_key.raw:
                    log.info("ignoring WatchConns from this relay's own key (a mesh loop to itself)")
                else:
                    self.table.add_watcher(self)
            elif t == FrameType.CLOSE_PEER:
                if n != KEY_LEN:
                    raise FrameError("bad_close_peer_len", f"ClosePeer of {n} bytes")
                if end < body + n:
                    return 0
                self.server.close_peer(bytes(mv[body : body + KEY_LEN]), self)
            else:
                if n < 2 * KEY_LEN or n > 2 * KEY_LEN + MAX_PACKET_SIZE:
                    raise FrameError("bad_forward_packet_len", f"ForwardPacket of {n} bytes")
                if end < body + n:
                    return 0
                self.server.receive_forwarded(self, bytes(mv[body : body + n]))
        else:
            # Unknown types, and known ones a server ignores (Pong, KeepAlive, a late ClientInfo):
            # read and discard at any length, as derper does.
            have = min(n, end - body)
            if have < 0:
                return 0
            self._discard = n - have
            return FRAME_HEADER_LEN + have
        return FRAME_HEADER_LEN + n

    def _note_preferred(self, preferred: bool) -> None:
        if preferred == self.is_home:
            return
        self.is_home = preferred
        st = self.stats
        moved = trio.current_time() - self.connected_at > HOME_MOVE_GRACE
        if preferred:
            st.current_home_connections += 1
            if moved:
                st.home_moves_in += 1
        else:
            st.current_home_connections -= 1
            if moved:
                st.home_moves_out += 1

    # -- writer ----------------------------------------------------------------------------------

    def _has_pending(self) -> bool:
        return bool(self._control or self._pending_pong is not None or self._send_queue or self._disco_queue)

    async def _write_loop(self) -> None:
        interval = self.server.keepalive_interval
        next_keepalive = trio.current_time() + interval + random.uniform(0, self.server.keepalive_jitter)
        transport = self.transport
        stats = self.stats
        while True:
            if not self._has_pending() and not transport.has_backlog:
                self._writer_idle = True
                try:
                    with trio.move_on_at(next_keepalive):
                        await self._wake.wait()
                finally:
                    self._writer_idle = False
            self._wake = trio.Event()
            parts: list[bytes] = []
            now = trio.current_time()
            if now >= next_keepalive:
                parts.append(_KEEPALIVE_FRAME)
                next_keepalive = now + interval + random.uniform(0, self.server.keepalive_jitter)
            if self._control:
                parts.extend(self._control)
                self._control.clear()
            if self._pending_pong is not None:
                parts.append(b"\x13\x00\x00\x00\x08" + self._pending_pong)
                self._pending_pong = None
                stats.sent_pong += 1
            entries = self._disco_queue.take_all()
            n_disco = len(entries)
            entries += self._send_queue.take_all()
            packets = nbytes = 0
            for e in entries:
                parts.append(e.frames)
                packets += e.packets
                nbytes += e.payload_bytes
                if e.src not in self.received_from:
                    self.table.note_delivered(self, e.src)
                stats.note_queue_delay(now - e.enqueued_at)
            # A packet enqueue wrote in part: its tail (the transport's backlog) goes out first.
            unfinished, self._unfinished = self._unfinished, None
            if unfinished is not None:
                packets += unfinished[0].packets
                nbytes += unfinished[0].payload_bytes
            if not parts and not transport.has_backlog:
                continue
            data = b"".join(parts) if len(parts) != 1 else parts[0]
            ok = False
            try:
                if self.write_timeout > 0:
                    with trio.move_on_after(self.write_timeout) as cs:
                        await transport.send_all(data)
                    if cs.cancelled_caught:
                        stats.sclient_write_timeouts += 1
                        self.close_reason = f"write timeout ({self.write_timeout:g}s)"
                        return
                else:
                    await transport.send_all(data)
                ok = True
            finally:
                if not ok:
                    if unfinished is not None:
                        e, disco = unfinished
                        stats.drop("write_error", disco, e.packets, e.payload_bytes)
                    for i, e in enumerate(entries):
                        stats.drop("write_error", i < n_disco, e.packets, e.payload_bytes)
            stats.packets_sent += packets
            stats.bytes_sent += nbytes
