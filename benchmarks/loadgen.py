"""DERP relay load generator: N pairs of real DERP clients, throughput and round-trip modes.

Runs as its own process (never inside the relay) so that relay CPU and load generator CPU are
separate. Each client connects over TCP (optionally TLS), upgrades with ``GET /derp`` and
``Upgrade: DERP``, and does the DERP handshake with :class:`natlib.derp.ClientConnection`. After
that the hot loops speak raw frames:

* **throughput**: one ``selectors`` loop over non-blocking sockets. Every client streams a
  pre-built ~64 KiB buffer of SendPacket frames to its partner, both directions, as fast as the
  relay takes them. Received bytes go through ``recv_into`` into one reused buffer and are checked
  as a stream: all frames from one partner are identical on the wire (RecvPacket, same length,
  partner's key, same payload), so the stream is periodic and a chunk is verified *byte for byte*
  with one ``startswith`` against a pre-built expected stream at the current phase. Frame counts
  are exact (``(phase + n) // frame_len``). Any mismatch drops to a real frame parser that checks
  each frame's type, length, source key and payload, counts control frames (KeepAlive, PeerGone)
  separately and counts everything else as a bad frame. After the measure window the senders stop
  on a frame boundary and the receivers drain, so ``sent - received`` is the exact number of frames
  the relay dropped (derper's queue policy drops the oldest packets when a receiver falls behind).
* **rtt**: one pair, one frame in flight: A sends, B receives and sends back, A receives. Blocking
  sockets in one thread (4 wakeups per round trip: relay, B, relay, A). Percentiles in µs.
* **handshakes**: a few client threads each loop TCP connect + TLS (full handshake, no resumption)
  + HTTP upgrade + DERP handshake (up to ServerInfo), then close, for N seconds → handshakes/s and
  the relay's CPU µs per handshake.
* **idle**: open N DERP clients (default plain HTTP), keep them idle, and read the relay's
  ``VmRSS`` before and after → bytes per idle connection. Raises its own ``RLIMIT_NOFILE`` soft
  limit to the hard limit first.

The server's CPU is read from ``/proc/<pid>/stat`` at the start and end of the measure window when
``--server-pid`` is given. Results are one JSON object on stdout with ``--json``.

Usage::

    python -m benchmarks.loadgen throughput --port 3340 --pairs 20 --size 1200 [--tls] --json
    python -m benchmarks.loadgen rtt --port 3340 --size 100 --count 20000 [--tls]
    python -m benchmarks.loadgen handshakes --port 443 --tls --duration 3 --parallel 4
    python -m benchmarks.loadgen idle --port 3340 --clients 1000 --server-pid PID
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from natlib.derp import NEED_DATA, ClientConnection, Connected
from natlib.keys import NodePrivateKey

__all__ = [
    "Endpoint",
    "open_derp",
    "proc_cpu_seconds",
    "proc_rss_kib",
    "raise_nofile",
    "run_handshakes",
    "run_idle",
    "run_rtt",
    "run_throughput",
]

HDR = 5
KEY = 32
SEND_PACKET = 0x04
RECV_PACKET = 0x05
CONTROL_TYPES = {
    0x06: "keepalive",
    0x08: "peer_gone",
    0x09: "peer_present",
    0x12: "ping",
    0x13: "pong",
    0x14: "health",
    0x15: "restarting",
    0x01: "server_key",
}
MAX_FRAME = 1 << 20  # what a Go client accepts
RBUF = 65536
_LEN = struct.Struct(">I").unpack_from
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all threads) from /proc/PID/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)


def proc_status_kib(pid: int, field: bytes = b"VmRSS:") -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...), or None."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB (VmRSS from /proc/PID/status)."""
    return proc_status_kib(pid, b"VmRSS:")


def proc_rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB, from /proc/PID/status."""
    kib = proc_rss_kib(pid)
    return None if kib is None else kib / 1024.0


def proc_threads(pid: int) -> int | None:
    return proc_status_kib(pid, b"Threads:")


def raise_nofile(want: int | None = None) -> int:
    """Raise the RLIMIT_NOFILE soft limit (to ``want`` or the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None or hard == resource.RLIM_INFINITY else min(want, hard)
    if want is not None and hard == resource.RLIM_INFINITY:
        target = want
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def system_busy_seconds() -> float | None:
    """CPU seconds all cores spent not idle (the aggregate line of /proc/stat)."""
    try:
        with open("/proc/stat", "rb") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / _CLK_TCK  # minus idle and iowait


def other_cpu(el: float, busy: float | None, srv: float | None, me: float) -> dict[str, float | None]:
    """System-wide busy CPU in the window and what neither the relay nor the load generator used."""
    if busy is None or el <= 0:
        return {"system_cpu_pct": None, "other_cpu_pct": None}
    other = max(0.0, busy - (srv or 0.0) - me)
    return {"system_cpu_pct": round(100.0 * busy / el, 1), "other_cpu_pct": round(100.0 * other / el, 1)}


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------------------
# connecting


@dataclass(frozen=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 3340
    tls: bool = False
    pin_sha256: str | None = None  # hex SHA-256 of the server's DER leaf; None = no verification
    timeout: float = 10.0

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The relay's certificate is self-signed; it is pinned by fingerprint below (if asked).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx


class HandshakeFailed(Exception):
    pass


def open_derp(ep: Endpoint, priv: NodePrivateKey, ctx: ssl.SSLContext | None = None) -> socket.socket:
    """A connected, handshaken DERP client socket (blocking, with ``ep.timeout``)."""
    raw = socket.create_connection((ep.host, ep.port), timeout=ep.timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock: socket.socket = raw
    try:
        if ep.tls:
            if ctx is None:
                ctx = ep.ssl_context()
            sock = ctx.wrap_socket(raw, server_hostname=ep.host)
            if ep.pin_sha256 is not None:
                der = sock.getpeercert(binary_form=True) or b""
                got = hashlib.sha256(der).hexdigest()
                if got != ep.pin_sha256.lower():
                    raise HandshakeFailed(f"TLS certificate pin mismatch: got sha256 {got}")
        req = (
            f"GET /derp HTTP/1.1\r\nHost: {ep.host}:{ep.port}\r\nUser-Agent: meshrelay-loadgen\r\n"
            "Upgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
        ).encode()
        sock.sendall(req)
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            d = sock.recv(4096)
            if not d:
                raise HandshakeFailed(f"connection closed during HTTP upgrade (got {bytes(buf[:200])!r})")
            buf += d
            if len(buf) > 16384:
                raise HandshakeFailed("HTTP response header too long")
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        parts = status.split(None, 2)
        if len(parts) < 2 or parts[1] != b"101":
            raise HandshakeFailed(f"HTTP upgrade refused: {status.decode(errors='replace')}")
        conn = ClientConnection(priv)
        conn.receive_data(rest)
        while True:
            ev = conn.next_event()
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(ev, Connected):
                break
            if ev is NEED_DATA:
                d = sock.recv(65536)
                if not d:
                    raise HandshakeFailed("connection closed during DERP handshake")
                conn.receive_data(d)
        return sock
    except BaseException:
        sock.close()
        raise


def tls_info(sock: socket.socket) -> dict[str, Any]:
    if isinstance(sock, ssl.SSLSocket):
        c = sock.cipher()
        return {"version": sock.version(), "cipher": c[0] if c else None}
    return {}


# --------------------------------------------------------------------------------------------------
# frames


def send_frame(dst: bytes, payload: bytes) -> bytes:
    return struct.pack(">BI", SEND_PACKET, KEY + len(payload)) + dst + payload


def recv_frame(src: bytes, payload: bytes) -> bytes:
    return struct.pack(">BI", RECV_PACKET, KEY + len(payload)) + src + payload


def make_payload(size: int, tag: int) -> bytes:
    """Deterministic, non-constant payload, different per direction (so misrouting shows)."""
    pat = bytes((tag * 7 + i * 13) & 0xFF for i in range(256))
    return (pat * (size // 256 + 1))[:size]


class StreamVerifier:
    """Counts and checks RecvPacket frames from one known sender, all of the same bytes.

    Fast path: the stream is periodic with period ``flen``; a chunk is checked against the
    expected stream at the current phase with one ``startswith`` (a memcmp). Slow path: a frame
    parser, used only after a mismatch (a control frame, a bad frame) until it re-synchronises.
    """

    __slots__ = (
        "bad",
        "broken",
        "errors",
        "expected",
        "flen",
        "frame",
        "frames",
        "other",
        "pending",
        "phase",
        "rx_bytes",
    )

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.flen = len(frame)
        reps = (RBUF + self.flen) // self.flen + 2
        self.expected = frame * reps
        self.phase = 0  # bytes into the current frame; -1 = slow mode (self.pending holds bytes)
        self.pending = bytearray()
        self.frames = 0
        self.rx_bytes = 0
        self.bad = 0
        self.other: dict[str, int] = {}
        self.errors: list[str] = []
        self.broken = False

    def feed(self, mv: memoryview) -> None:
        n = len(mv)
        self.rx_bytes += n
        phase = self.phase
        if phase >= 0:
            if self.expected.startswith(mv, phase):
                t = phase + n
                flen = self.flen
                self.frames += t // flen
                self.phase = t % flen
                return
            self.pending = bytearray(self.frame[:phase])
            self.phase = -1
        if self.broken:
            return
        self.pending += mv
        self._parse()

    def _error(self, msg: str) -> None:
        self.bad += 1
        if len(self.errors) < 5:
            self.errors.append(msg)

    def _parse(self) -> None:
        b = self.pending
        nb = len(b)
        off = 0
        flen = self.flen
        frame = self.frame
        while nb - off >= HDR:
            t = b[off]
            ln = _LEN(b, off + 1)[0]
            if ln > MAX_FRAME:
                self._error(f"frame type {t:#04x} with length {ln} > 1 MiB; stream lost, not checked further")
                self.broken = True
                self.pending = bytearray()
                return
            end = off + HDR + ln
            if end > nb:
                break
            if t == RECV_PACKET:
                if end - off == flen and b.startswith(frame, off):
                    self.frames += 1
                elif end - off != flen:
                    self._error(f"RecvPacket of length {ln}, expected {flen - HDR}")
                elif b[off + HDR : off + HDR + KEY] != frame[HDR : HDR + KEY]:
                    self._error(
                        f"RecvPacket from unexpected source {bytes(b[off + HDR : off + HDR + 8]).hex()}…"
                    )
                else:
                    self._error("RecvPacket payload differs from what was sent")
            else:
                name = CONTROL_TYPES.get(t)
                if name is None:
                    self._error(f"unexpected frame type {t:#04x} (length {ln})")
                else:
                    self.other[name] = self.other.get(name, 0) + 1
            off = end
        rest = b[off:]
        if len(rest) < flen and frame.startswith(rest):
            self.phase = len(rest)
            self.pending = bytearray()
        else:
            self.pending = bytearray(rest)


# --------------------------------------------------------------------------------------------------
# throughput


class Client:
    __slots__ = (
        "blocked_at",
        "closed",
        "error",
        "name",
        "partner",
        "rx",
        "sock",
        "tls",
        "tx",
        "tx_bytes",
        "tx_off",
        "txmv",
        "want_w",
        "written_off",
    )

    def __init__(self, name: str, sock: socket.socket, tx: bytes, rx: StreamVerifier) -> None:
        self.name = name
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.tx = tx
        self.txmv = memoryview(tx)
        self.tx_off = 0
        self.tx_bytes = 0
        self.rx = rx
        self.closed = False
        self.error: str | None = None
        self.partner: Client = self
        self.want_w = True  # registered for EVENT_WRITE
        self.blocked_at = 0.0  # window full since (0 = not blocked)
        self.written_off = 0  # frames given up on after a stall (dropped by the relay)


_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def run_throughput(
    ep: Endpoint,
    pairs: int,
    size: int,
    warmup: float,
    duration: float,
    server_pid: int | None = None,
    drain_timeout: float = 3.0,
    window: int = 0,
) -> dict[str, Any]:
    """``window`` > 0: each sender keeps at most that many frames in flight (sent to the relay, not
    yet received by its partner), so a relay that drops on overload (derper's 32-packet queue) is
    measured at its lossless rate. A sender whose window stays full for 50 ms writes the missing
    frames off as lost. ``window`` 0 (the default): flood, as fast as the relay accepts."""
    flen = HDR + KEY + size
    ctx = ep.ssl_context() if ep.tls else None
    t_conn = time.perf_counter()
    keys = [NodePrivateKey.generate() for _ in range(2 * pairs)]
    socks: list[socket.socket] = []
    clients: list[Client] = []
    try:
        for k in keys:
            socks.append(open_derp(ep, k, ctx))
        connect_s = time.perf_counter() - t_conn
        per_buf = max(1, 65536 // flen)
        for i in range(2 * pairs):
            j = i ^ 1  # partner
            me, peer = keys[i].public.raw, keys[j].public.raw
            tx = send_frame(peer, make_payload(size, i)) * per_buf
            rx = StreamVerifier(recv_frame(peer, make_payload(size, j)))
            clients.append(Client(f"p{i // 2}{'ab'[i % 2]}", socks[i], tx, rx))
            del me
        for i, c in enumerate(clients):
            c.partner = clients[i ^ 1]
        info = tls_info(socks[0])
        return _pump(clients, flen, warmup, duration, server_pid, drain_timeout, window) | {
            "mode": "throughput",
            "window_frames": window,
            "tls": ep.tls,
            "tls_info": info,
            "pairs": pairs,
            "clients": 2 * pairs,
            "payload": size,
            "frame_bytes": flen,
            "warmup_s": warmup,
            "duration_s": duration,
            "connect_s": round(connect_s, 4),
        }
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass


def _pump(
    clients: list[Client],
    flen: int,
    warmup: float,
    duration: float,
    server_pid: int | None,
    drain_timeout: float,
    window: int = 0,
) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    wbytes = window * flen
    blocked: set[Client] = set()
    stalls = 0
    stall_s = 0.05
    R, W = selectors.EVENT_READ, selectors.EVENT_WRITE
    for cl in clients:
        cl.sock.setblocking(False)
        sel.register(cl.sock, R | W, cl)
    rbuf = bytearray(RBUF)
    rmv = memoryview(rbuf)
    now = time.perf_counter
    t0 = now()
    warm_end = t0 + warmup
    meas_end = warm_end + duration
    state = 0  # 0 warm-up, 1 measuring, 2 stopping/draining
    start: dict[str, Any] = {}
    end: dict[str, Any] = {}
    last_rx = t0
    max_gap = 0.0
    drain_deadline = 0.0
    stopping: set[Client] = set()

    def snapshot() -> dict[str, Any]:
        return {
            "t": now(),
            "rx": [c.rx.frames for c in clients],
            "tx": sum(c.tx_bytes for c in clients) // flen,
            "srv": proc_cpu_seconds(server_pid) if server_pid else None,
            "me": self_cpu_seconds(),
            "sys": system_busy_seconds(),
        }

    while True:
        events = sel.select(0.02)
        got = False
        for key, mask in events:
            c: Client = key.data
            if mask & R and not c.closed:
                reads = 0
                sock = c.sock
                while True:
                    try:
                        n = sock.recv_into(rbuf)
                    except _WOULD_BLOCK:
                        break
                    except OSError as e:
                        c.closed = True
                        c.error = f"recv: {e!r}"
                        break
                    if n == 0:
                        c.closed = True
                        c.error = "relay closed the connection"
                        break
                    got = True
                    c.rx.feed(rmv[:n])
                    reads += 1
                    if reads >= 8 or (not c.tls and n < RBUF):
                        break
                if c.closed:
                    sel.unregister(sock)
                    continue
                pc = c.partner
                if (
                    pc in blocked
                    and not pc.closed
                    and (state < 2 or pc in stopping)
                    and wbytes - (pc.tx_bytes - (c.rx.frames + pc.written_off) * flen) > 0
                ):
                    blocked.discard(pc)
                    pc.blocked_at = 0.0
                    pc.want_w = True
                    sel.modify(pc.sock, R | W, pc)
            if mask & W and not c.closed:
                stop = len(c.tx)
                if wbytes:
                    room = wbytes - (c.tx_bytes - (c.partner.rx.frames + c.written_off) * flen)
                    if room <= 0:
                        if c.want_w:
                            c.want_w = False
                            c.blocked_at = now()
                            blocked.add(c)
                            sel.modify(c.sock, R, c)
                        continue
                    stop = min(stop, c.tx_off + room)
                try:
                    n = c.sock.send(c.txmv[c.tx_off : stop])
                except _WOULD_BLOCK:
                    n = 0
                except OSError as e:
                    c.closed = True
                    c.error = f"send: {e!r}"
                    sel.unregister(c.sock)
                    continue
                c.tx_bytes += n
                c.tx_off += n
                if c.tx_off == len(c.tx):
                    c.tx_off = 0
                if state == 2 and c in stopping and c.tx_off % flen == 0:
                    stopping.discard(c)
                    c.want_w = False
                    sel.modify(c.sock, R, c)
        t = now()
        if blocked:
            for bc in [b for b in blocked if t - b.blocked_at > stall_s]:
                # window full for 50 ms: the relay dropped those frames; write them off
                blocked.discard(bc)
                bc.blocked_at = 0.0
                bc.written_off = bc.tx_bytes // flen - bc.partner.rx.frames
                stalls += 1
                if not bc.closed and (state < 2 or bc in stopping):
                    bc.want_w = True
                    sel.modify(bc.sock, R | W, bc)
        if got:
            gap = t - last_rx
            if gap > max_gap and state < 2:
                max_gap = gap
            last_rx = t
        if state == 0 and t >= warm_end:
            start = snapshot()
            state = 1
        elif state == 1 and t >= meas_end:
            end = snapshot()
            state = 2
            drain_deadline = t + drain_timeout
            for c in clients:
                if c.closed:
                    continue
                if c.tx_off % flen == 0:
                    c.want_w = False
                    blocked.discard(c)
                    sel.modify(c.sock, R, c)
                else:
                    stopping.add(c)
        elif state == 2:
            if not stopping:
                sent = sum(c.tx_bytes for c in clients) // flen
                recvd = sum(c.rx.frames for c in clients)
                if recvd >= sent or t - last_rx > 0.5:
                    break
            if t > drain_deadline:
                break
        if all(c.closed for c in clients):
            if not end:
                end = snapshot()
            break
    sel.close()

    el = end["t"] - start["t"]
    rx_per = [b - a for a, b in zip(start["rx"], end["rx"], strict=True)]
    frames = sum(rx_per)
    tx_win = end["tx"] - start["tx"]
    sent_total = sum(c.tx_bytes for c in clients) // flen
    recv_total = sum(c.rx.frames for c in clients)
    srv_cpu = None
    if start["srv"] is not None and end["srv"] is not None:
        srv_cpu = end["srv"] - start["srv"]
    other: dict[str, int] = {}
    for c in clients:
        for k, v in c.rx.other.items():
            other[k] = other.get(k, 0) + v
    errors = [f"{c.name}: {e}" for c in clients for e in c.rx.errors]
    conn_errors = [f"{c.name}: {c.error}" for c in clients if c.error]
    leftover = sum(1 for c in clients if c.rx.phase != 0)
    fps = frames / el if el > 0 else 0.0
    res: dict[str, Any] = {
        "elapsed_s": round(el, 4),
        "frames": frames,
        "frames_per_s": round(fps, 1),
        "mbit_per_s": round(fps * flen * 8 / 1e6, 2),
        "offered_frames_per_s": round(tx_win / el, 1) if el > 0 else 0.0,
        "per_receiver_frames_per_s": {
            "min": round(min(rx_per) / el, 1) if el > 0 else 0.0,
            "max": round(max(rx_per) / el, 1) if el > 0 else 0.0,
        },
        "sent_frames_total": sent_total,
        "received_frames_total": recv_total,
        "lost_frames": sent_total - recv_total,
        "lost_pct": round(100.0 * (sent_total - recv_total) / sent_total, 3) if sent_total else 0.0,
        "partial_frames_at_end": leftover,
        "window_stalls": stalls,
        "max_rx_gap_ms": round(max_gap * 1000, 2),
        "bad_frames": sum(c.rx.bad for c in clients),
        "bad_frame_examples": errors[:10],
        "control_frames": other,
        "connection_errors": conn_errors,
        "loadgen_cpu_pct": round(100.0 * (end["me"] - start["me"]) / el, 1) if el > 0 else None,
        "server_cpu_s": round(srv_cpu, 4) if srv_cpu is not None else None,
        "server_cpu_pct": round(100.0 * srv_cpu / el, 1) if srv_cpu is not None and el > 0 else None,
        "server_us_per_frame": round(srv_cpu * 1e6 / frames, 4) if srv_cpu is not None and frames else None,
        "server_rss_mib": _round(proc_rss_mib(server_pid) if server_pid else None, 1),
    }
    busy = end["sys"] - start["sys"] if end["sys"] is not None and start["sys"] is not None else None
    res |= other_cpu(el, busy, srv_cpu, end["me"] - start["me"])
    return res


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


# --------------------------------------------------------------------------------------------------
# round trip


def _recv_one(sock: socket.socket, v: StreamVerifier, buf: bytearray, mv: memoryview) -> None:
    """Read until the verifier has counted one more data frame."""
    target = v.frames + 1
    while v.frames < target:
        n = sock.recv_into(buf)
        if n == 0:
            raise ConnectionError("relay closed the connection")
        v.feed(mv[:n])
        if v.broken:
            raise ConnectionError("stream lost: " + "; ".join(v.errors))


def run_rtt(
    ep: Endpoint,
    size: int,
    count: int,
    warmup_count: int,
    server_pid: int | None = None,
) -> dict[str, Any]:
    ka, kb = NodePrivateKey.generate(), NodePrivateKey.generate()
    ctx = ep.ssl_context() if ep.tls else None
    a = open_derp(ep, ka, ctx)
    try:
        b = open_derp(ep, kb, ctx)
    except BaseException:
        a.close()
        raise
    try:
        pa, pb = make_payload(size, 0), make_payload(size, 1)
        fa = send_frame(kb.public.raw, pa)  # A -> B
        fb = send_frame(ka.public.raw, pb)  # B -> A
        va = StreamVerifier(recv_frame(kb.public.raw, pb))
        vb = StreamVerifier(recv_frame(ka.public.raw, pa))
        buf = bytearray(RBUF)
        mv = memoryview(buf)
        samples: list[int] = []
        clock = time.perf_counter_ns
        deadline = time.monotonic() + max(30.0, (count + warmup_count) * 0.005)
        srv0 = me0 = t0 = 0.0
        sys0: float | None = None
        for i in range(warmup_count + count):
            if i == warmup_count:
                srv0 = (proc_cpu_seconds(server_pid) or 0.0) if server_pid else 0.0
                me0 = self_cpu_seconds()
                sys0 = system_busy_seconds()
                t0 = time.perf_counter()
            s = clock()
            a.sendall(fa)
            _recv_one(b, vb, buf, mv)
            b.sendall(fb)
            _recv_one(a, va, buf, mv)
            e = clock()
            if i >= warmup_count:
                samples.append(e - s)
            if (i & 1023) == 0 and time.monotonic() > deadline:
                break
        el = time.perf_counter() - t0
        srv1 = (proc_cpu_seconds(server_pid) or 0.0) if server_pid else None
        me1 = self_cpu_seconds()
        sys1 = system_busy_seconds()
        info = tls_info(a)
    finally:
        a.close()
        b.close()
    samples.sort()
    n = len(samples)

    def pct(p: float) -> float:
        return round(samples[min(n - 1, int(p / 100.0 * n))] / 1000.0, 1) if n else 0.0

    srv_cpu = (srv1 - srv0) if srv1 is not None else None
    busy = sys1 - sys0 if sys0 is not None and sys1 is not None else None
    return other_cpu(el, busy, srv_cpu, me1 - me0) | {
        "mode": "rtt",
        "tls": ep.tls,
        "tls_info": info,
        "pairs": 1,
        "payload": size,
        "frame_bytes": HDR + KEY + size,
        "round_trips": n,
        "warmup_round_trips": warmup_count,
        "elapsed_s": round(el, 4),
        "rtt_us": {
            "min": pct(0),
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "p999": pct(99.9),
            "max": round(samples[-1] / 1000.0, 1) if n else 0.0,
            "mean": round(sum(samples) / n / 1000.0, 1) if n else 0.0,
        },
        "frames_per_s": round(2 * n / el, 1) if el > 0 else 0.0,
        "bad_frames": va.bad + vb.bad,
        "bad_frame_examples": (va.errors + vb.errors)[:10],
        "control_frames": {k: va.other.get(k, 0) + vb.other.get(k, 0) for k in set(va.other) | set(vb.other)},
        "connection_errors": [],
        "loadgen_cpu_pct": round(100.0 * (me1 - me0) / el, 1) if el > 0 else None,
        "server_cpu_s": round(srv_cpu, 4) if srv_cpu is not None else None,
        "server_cpu_pct": round(100.0 * srv_cpu / el, 1) if srv_cpu is not None and el > 0 else None,
        "server_us_per_rtt": round(srv_cpu * 1e6 / n, 2) if srv_cpu is not None and n else None,
        "server_us_per_frame": round(srv_cpu * 1e6 / (2 * n), 2) if srv_cpu is not None and n else None,
    }


# --------------------------------------------------------------------------------------------------
# handshake rate


def run_handshakes(
    ep: Endpoint,
    duration: float,
    parallel: int = 4,
    server_pid: int | None = None,
    warmup: float = 0.5,
) -> dict[str, Any]:
    """``parallel`` threads each loop connect + (TLS) + upgrade + DERP handshake + close.

    Every TLS handshake is a full one (a fresh client session each time, no resumption). Counts
    the handshakes completed inside the measure window (after ``warmup``).
    """
    ctx = ep.ssl_context() if ep.tls else None
    keys_per_thread = 64  # rotate keys so a reconnect never races the relay's close of the same key
    keys = [[NodePrivateKey.generate() for _ in range(keys_per_thread)] for _ in range(parallel)]
    now = time.perf_counter
    t_start = now()
    meas0 = t_start + warmup
    meas1 = meas0 + duration
    counts = [0] * parallel
    totals = [0] * parallel
    lat: list[list[float]] = [[] for _ in range(parallel)]
    errors: list[str] = []
    n_errors = [0]
    lock = threading.Lock()
    info: dict[str, Any] = {}

    def worker(i: int) -> None:
        ks = keys[i]
        j = 0
        while True:
            t0 = now()
            if t0 >= meas1:
                return
            try:
                s = open_derp(ep, ks[j % keys_per_thread], ctx)
            except (OSError, HandshakeFailed, ssl.SSLError) as e:
                with lock:
                    n_errors[0] += 1
                    if len(errors) < 10:
                        errors.append(f"{type(e).__name__}: {e}")
                    if n_errors[0] > 1000:
                        return
                continue
            t1 = now()
            if not info and i == 0:
                info.update(tls_info(s))
            s.close()
            j += 1
            totals[i] += 1
            if meas0 <= t0 and t1 <= meas1:
                counts[i] += 1
                lat[i].append(t1 - t0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(parallel)]
    for t in threads:
        t.start()
    # edges of the measure window
    time.sleep(max(0.0, meas0 - now()))
    srv0 = proc_cpu_seconds(server_pid) if server_pid else None
    me0 = self_cpu_seconds()
    sys0 = system_busy_seconds()
    w0 = now()
    time.sleep(max(0.0, meas1 - now()))
    srv1 = proc_cpu_seconds(server_pid) if server_pid else None
    me1 = self_cpu_seconds()
    sys1 = system_busy_seconds()
    el = now() - w0
    for t in threads:
        t.join(timeout=ep.timeout + 5)
    n = sum(counts)
    samples = sorted(x for xs in lat for x in xs)

    def pct(p: float) -> float | None:
        return (
            round(samples[min(len(samples) - 1, int(p / 100.0 * len(samples)))] * 1e3, 3) if samples else None
        )

    srv_cpu = srv1 - srv0 if srv0 is not None and srv1 is not None else None
    busy = sys1 - sys0 if sys0 is not None and sys1 is not None else None
    return other_cpu(el, busy, srv_cpu, me1 - me0) | {
        "mode": "handshakes",
        "tls": ep.tls,
        "tls_info": info,
        "parallel": parallel,
        "warmup_s": warmup,
        "duration_s": duration,
        "elapsed_s": round(el, 4),
        "handshakes": n,
        "handshakes_total": sum(totals),
        "handshakes_per_s": round(n / duration, 1) if duration > 0 else 0.0,
        "handshake_ms": {"p50": pct(50), "p99": pct(99), "max": pct(100)},
        "handshake_errors": n_errors[0],
        "connection_errors": errors,
        "bad_frames": 0,
        "loadgen_cpu_pct": round(100.0 * (me1 - me0) / el, 1) if el > 0 else None,
        "server_cpu_s": round(srv_cpu, 4) if srv_cpu is not None else None,
        "server_cpu_pct": round(100.0 * srv_cpu / el, 1) if srv_cpu is not None and el > 0 else None,
        "server_us_per_handshake": round(srv_cpu * 1e6 / n, 1) if srv_cpu is not None and n else None,
        "server_rss_mib": _round(proc_rss_mib(server_pid) if server_pid else None, 1),
    }


# --------------------------------------------------------------------------------------------------
# idle connections: memory per connection


def _rss_settled(pid: int, max_wait: float) -> int | None:
    """VmRSS once two readings 0.25 s apart differ by < 0.5 % (or after ``max_wait``)."""
    prev = proc_rss_kib(pid)
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        time.sleep(0.25)
        cur = proc_rss_kib(pid)
        if cur is None or prev is None:
            return cur
        if abs(cur - prev) <= max(64, prev // 200):
            return cur
        prev = cur
    return proc_rss_kib(pid)


def _mem_available_mib() -> float:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return 4096.0


def _alive(sock: socket.socket) -> bool:
    """True if the relay has not closed the connection (pending data, e.g. a KeepAlive, is fine)."""
    try:
        sock.setblocking(False)
        d = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False
    return bool(d)


def run_idle(
    ep: Endpoint,
    clients: int,
    server_pid: int,
    parallel: int = 8,
    hold: float = 1.0,
    settle: float = 3.0,
    open_timeout: float = 120.0,
    max_rss_mib: float | None = None,
) -> dict[str, Any]:
    """Open ``clients`` DERP clients, keep them idle, report the relay's RSS growth per client.

    Stops opening early (and says so) if the relay's RSS passes ``max_rss_mib`` (default: half of
    MemAvailable, at most 8 GiB), so a relay with a large per-connection cost cannot exhaust the box.
    """
    if max_rss_mib is None:
        max_rss_mib = min(8192.0, _mem_available_mib() / 2)
    cap_kib = int(max_rss_mib * 1024)
    capped = [False]
    nofile = raise_nofile()
    if clients + 64 > nofile:
        raise OSError(f"RLIMIT_NOFILE is {nofile}; {clients} clients need about {clients + 64}")
    ctx = ep.ssl_context() if ep.tls else None
    keys = [NodePrivateKey.generate() for _ in range(clients)]
    threads0 = proc_threads(server_pid)
    rss0 = _rss_settled(server_pid, settle)
    hwm0 = proc_status_kib(server_pid, b"VmHWM:")
    socks: list[socket.socket] = []
    errors: list[str] = []
    n_err = [0]
    lock = threading.Lock()
    nxt = [0]
    deadline = time.monotonic() + open_timeout
    t0 = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                if i >= clients or n_err[0] > 50 or time.monotonic() > deadline or capped[0]:
                    return
                nxt[0] += 1
            if i % 100 == 99 and (proc_rss_kib(server_pid) or 0) > cap_kib:
                capped[0] = True
            try:
                s = open_derp(ep, keys[i], ctx)
            except (OSError, HandshakeFailed, ssl.SSLError) as e:
                with lock:
                    n_err[0] += 1
                    if len(errors) < 10:
                        errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                socks.append(s)

    try:
        ths = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(timeout=open_timeout + 30)
        open_s = time.perf_counter() - t0
        time.sleep(hold)
        rss1 = _rss_settled(server_pid, settle)
        hwm1 = proc_status_kib(server_pid, b"VmHWM:")
        threads1 = proc_threads(server_pid)
        alive = sum(1 for s in socks if _alive(s))
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
    n = len(socks)
    delta = (rss1 - rss0) if rss0 is not None and rss1 is not None else None
    return {
        "mode": "idle",
        "tls": ep.tls,
        "clients_requested": clients,
        "clients": n,
        "clients_alive_at_end": alive,
        "open_s": round(open_s, 3),
        "opens_per_s": round(n / open_s, 1) if open_s > 0 else None,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "rss_delta_kib": delta,
        "hwm_before_kib": hwm0,
        "hwm_after_kib": hwm1,
        "server_threads_before": threads0,
        "server_threads_after": threads1,
        "bytes_per_conn": round(delta * 1024 / n, 1) if delta is not None and n else None,
        "connection_errors": errors + ([f"{n_err[0]} failed opens"] if n_err[0] else []),
        "bad_frames": 0,
        "nofile_limit": nofile,
        "rss_cap_mib": round(max_rss_mib, 1),
        "stopped_at_rss_cap": capped[0],
    }


# --------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--port", type=int, default=3340)
    common.add_argument("--tls", action="store_true", help="connect with TLS (self-signed cert accepted)")
    common.add_argument("--pin-sha256", help="hex SHA-256 of the relay's DER certificate to require")
    common.add_argument("--size", type=int, default=100, help="packet payload bytes (frame = 37 + size)")
    common.add_argument("--server-pid", type=int, help="relay PID, for its CPU time from /proc")
    common.add_argument("--json", action="store_true", help="print one JSON object only")
    t = sub.add_parser("throughput", parents=[common], help="N pairs streaming both ways")
    t.add_argument("--pairs", type=int, default=1)
    t.add_argument("--warmup", type=float, default=1.0)
    t.add_argument("--duration", type=float, default=3.0)
    t.add_argument(
        "--window", type=int, default=0, help="max frames in flight per sender (0 = flood, the default)"
    )
    r = sub.add_parser("rtt", parents=[common], help="one pair, one frame in flight")
    r.add_argument("--count", type=int, default=20000)
    r.add_argument("--warmup-count", type=int, default=500)
    h = sub.add_parser("handshakes", parents=[common], help="connect+TLS+upgrade+DERP handshake+close, rate")
    h.add_argument("--duration", type=float, default=3.0)
    h.add_argument("--warmup", type=float, default=0.5)
    h.add_argument("--parallel", type=int, default=4, help="client threads")
    i = sub.add_parser("idle", parents=[common], help="N idle clients; relay RSS per connection")
    i.add_argument("--clients", type=int, default=1000)
    i.add_argument("--parallel", type=int, default=8, help="threads opening the connections")
    i.add_argument("--hold", type=float, default=1.0, help="seconds idle before reading RSS")
    i.add_argument(
        "--max-rss-mib",
        type=float,
        help="stop opening above this relay RSS (default: ½ MemAvailable, ≤ 8 GiB)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print("loadgen: refusing a non-loopback host", file=sys.stderr)
        return 2
    if not 0 <= a.size <= 65536:
        print("loadgen: --size must be 0..65536", file=sys.stderr)
        return 2
    ep = Endpoint(a.host, a.port, a.tls, a.pin_sha256)
    try:
        if a.mode == "throughput":
            if not (1 <= a.pairs <= 500 and 0 < a.duration <= 120 and 0 <= a.warmup <= 60):
                print("loadgen: pairs 1..500, duration ≤ 120 s, warm-up ≤ 60 s", file=sys.stderr)
                return 2
            if not 0 <= a.window <= 100_000:
                print("loadgen: --window 0..100000", file=sys.stderr)
                return 2
            res = run_throughput(ep, a.pairs, a.size, a.warmup, a.duration, a.server_pid, window=a.window)
        elif a.mode == "handshakes":
            if not (1 <= a.parallel <= 64 and 0 < a.duration <= 120 and 0 <= a.warmup <= 60):
                print("loadgen: parallel 1..64, duration ≤ 120 s, warm-up ≤ 60 s", file=sys.stderr)
                return 2
            res = run_handshakes(ep, a.duration, a.parallel, a.server_pid, a.warmup)
        elif a.mode == "idle":
            if not (1 <= a.clients <= 50_000 and 1 <= a.parallel <= 64 and 0 <= a.hold <= 60):
                print("loadgen: clients 1..50000, parallel 1..64, hold ≤ 60 s", file=sys.stderr)
                return 2
            if not a.server_pid:
                print("loadgen: idle needs --server-pid (to read the relay's RSS)", file=sys.stderr)
                return 2
            res = run_idle(ep, a.clients, a.server_pid, a.parallel, a.hold, max_rss_mib=a.max_rss_mib)
        else:
            if not 1 <= a.count <= 1_000_000:
                print("loadgen: --count must be 1..1000000", file=sys.stderr)
                return 2
            res = run_rtt(ep, a.size, a.count, a.warmup_count, a.server_pid)
    except (OSError, HandshakeFailed, ConnectionError, ssl.SSLError) as e:
        res = {"mode": a.mode, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res) if a.json else f"loadgen failed: {res['error']}")
        return 1
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28} {v}")
    return 1 if res.get("bad_frames") or res.get("connection_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
