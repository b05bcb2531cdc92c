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

The server's CPU is read from ``/proc/<pid>/stat`` at the start and end of the measure window when
``--server-pid`` is given. Results are one JSON object on stdout with ``--json``.

Usage::

    python -m benchmarks.loadgen throughput --port 3340 --pairs 20 --size 1200 [--tls] --json
    python -m benchmarks.loadgen rtt --port 3340 --size 100 --count 20000 [--tls]
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
import time
from dataclasses import dataclass
from typing import Any

from natlib.derp import NEED_DATA, ClientConnection, Connected
from natlib.keys import NodePrivateKey

__all__ = [
    "Endpoint",
    "open_derp",
    "proc_cpu_seconds",
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


def proc_rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB, from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


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
    __slots__ = ("closed", "error", "name", "rx", "sock", "tls", "tx", "tx_bytes", "tx_off", "txmv")

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


_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def run_throughput(
    ep: Endpoint,
    pairs: int,
    size: int,
    warmup: float,
    duration: float,
    server_pid: int | None = None,
    drain_timeout: float = 3.0,
) -> dict[str, Any]:
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
        info = tls_info(socks[0])
        return _pump(clients, flen, warmup, duration, server_pid, drain_timeout) | {
            "mode": "throughput",
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
) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    R, W = selectors.EVENT_READ, selectors.EVENT_WRITE
    for c in clients:
        c.sock.setblocking(False)
        sel.register(c.sock, R | W, c)
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
            if mask & W and not c.closed:
                try:
                    n = c.sock.send(c.txmv[c.tx_off :])
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
                    sel.modify(c.sock, R, c)
        t = now()
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
    r = sub.add_parser("rtt", parents=[common], help="one pair, one frame in flight")
    r.add_argument("--count", type=int, default=20000)
    r.add_argument("--warmup-count", type=int, default=500)
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
            res = run_throughput(ep, a.pairs, a.size, a.warmup, a.duration, a.server_pid)
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
