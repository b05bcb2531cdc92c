"""The lab's helper programs, run inside lab hosts as a standalone script (stdlib only).

The lab runs this file as ``python -I -S _agent.py COMMAND ...`` inside a namespace, so it must not
import natlib (or anything outside the standard library). Commands:

``stun-server``  a STUN server (RFC 5389 Binding, RFC 5780 CHANGE-REQUEST, UDP and TCP) that answers
                 from a second port and address when asked: the lab's NAT measuring instrument.
``probe-mapping``   one UDP socket, Binding requests to several server endpoints: prints what each saw.
``probe-filtering`` RFC 5780 filtering tests from one socket: which unsolicited sources get through.
``probe-tcp``    a Binding request over TCP.
``recv`` / ``send``  receive or send plain UDP datagrams.
``punch``        plain-socket UDP hole punching toward a peer (learned via STUN, given on stdin).

Every command prints JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import socket
import struct
import sys
import time
from typing import Any

MAGIC = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_RESPONSE = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_RESPONSE_ORIGIN = 0x802B
ATTR_OTHER_ADDRESS = 0x802C
CHANGE_IP = 0x04
CHANGE_PORT = 0x02

Endpoint = tuple[str, int]


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_endpoint(text: str) -> Endpoint:
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host, int(port)
    host, _, port = text.rpartition(":")
    return host, int(port)


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# --- STUN codec (just what the lab needs) ---------------------------------------------------------


def encode_address(attr: int, ep: Endpoint, txid: bytes, xor: bool) -> bytes:
    host, port = ep
    fam = family_of(host)
    raw = socket.inet_pton(fam, host)
    if xor:
        port ^= MAGIC >> 16
        key = struct.pack("!I", MAGIC) + txid
        raw = bytes(b ^ key[i] for i, b in enumerate(raw))
    value = struct.pack("!BBH", 0, 1 if fam == socket.AF_INET else 2, port) + raw
    return struct.pack("!HH", attr, len(value)) + value


def decode_address(value: bytes, txid: bytes, xor: bool) -> Endpoint:
    fam_code, port = struct.unpack("!xBH", value[:4])
    raw = value[4:]
    if xor:
        port ^= MAGIC >> 16
        key = struct.pack("!I", MAGIC) + txid
        raw = bytes(b ^ key[i] for i, b in enumerate(raw))
    fam = socket.AF_INET if fam_code == 1 else socket.AF_INET6
    return socket.inet_ntop(fam, raw), port


def build_message(msg_type: int, txid: bytes, attrs: bytes = b"") -> bytes:
    return struct.pack("!HHI", msg_type, len(attrs), MAGIC) + txid + attrs


def parse_message(data: bytes) -> tuple[int, bytes, dict[int, bytes]] | None:
    if len(data) < 20:
        return None
    msg_type, length, magic = struct.unpack("!HHI", data[:8])
    if magic != MAGIC or len(data) < 20 + length:
        return None
    txid = data[8:20]
    attrs: dict[int, bytes] = {}
    pos = 20
    while pos + 4 <= 20 + length:
        atype, alen = struct.unpack("!HH", data[pos : pos + 4])
        attrs.setdefault(atype, data[pos + 4 : pos + 4 + alen])
        pos += 4 + alen + (-alen % 4)
    return msg_type, txid, attrs


def binding_request(change: int = 0) -> tuple[bytes, bytes]:
    txid = secrets.token_bytes(12)
    attrs = b""
    if change:
        attrs = struct.pack("!HHI", ATTR_CHANGE_REQUEST, 4, change)
    return txid, build_message(BINDING_REQUEST, txid, attrs)


def mapped_of(data: bytes, txid: bytes) -> Endpoint | None:
    msg = parse_message(data)
    if msg is None or msg[0] != BINDING_RESPONSE or msg[1] != txid:
        return None
    attrs = msg[2]
    if ATTR_XOR_MAPPED_ADDRESS in attrs:
        return decode_address(attrs[ATTR_XOR_MAPPED_ADDRESS], txid, True)
    if ATTR_MAPPED_ADDRESS in attrs:
        return decode_address(attrs[ATTR_MAPPED_ADDRESS], txid, False)
    return None


# --- stun-server ----------------------------------------------------------------------------------


def cmd_stun_server(args: argparse.Namespace) -> int:
    addrs: list[str] = args.address
    ports: list[int] = args.port
    udp: dict[Endpoint, socket.socket] = {}
    tcp: dict[socket.socket, Endpoint] = {}
    for addr in addrs:
        fam = family_of(addr)
        for port in ports:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            udp[(addr, port)] = s
            t = socket.socket(fam, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((addr, port))
            t.listen(64)
            tcp[t] = (addr, port)

    def other(local: Endpoint, change: int) -> Endpoint:
        host, port = local
        same_family = [a for a in addrs if family_of(a) == family_of(host)]
        if change & CHANGE_IP and len(same_family) > 1:
            host = same_family[(same_family.index(host) + 1) % len(same_family)]
        if change & CHANGE_PORT and len(ports) > 1:
            port = ports[(ports.index(port) + 1) % len(ports)]
        return host, port

    def response(txid: bytes, src: Endpoint, origin: Endpoint) -> bytes:
        attrs = encode_address(ATTR_XOR_MAPPED_ADDRESS, src, txid, True)
        attrs += encode_address(ATTR_MAPPED_ADDRESS, src, txid, False)
        attrs += encode_address(ATTR_RESPONSE_ORIGIN, origin, txid, False)
        alt = other(origin, CHANGE_IP | CHANGE_PORT)
        if alt != origin:
            attrs += encode_address(ATTR_OTHER_ADDRESS, alt, txid, False)
        return build_message(BINDING_RESPONSE, txid, attrs)

    emit({"ready": [list(k) for k in udp]})
    by_fd = {s.fileno(): (k, s) for k, s in udp.items()}
    tcp_by_fd = {t.fileno(): t for t in tcp}
    while True:
        readable, _, _ = select.select([*by_fd, *tcp_by_fd], [], [])
        for fd in readable:
            if fd in tcp_by_fd:
                t = tcp_by_fd[fd]
                try:
                    conn, peer = t.accept()
                except OSError:
                    continue
                with conn:
                    conn.settimeout(2.0)
                    try:
                        data = conn.recv(2048)
                        msg = parse_message(data)
                        if msg and msg[0] == BINDING_REQUEST:
                            conn.sendall(response(msg[1], (peer[0], peer[1]), tcp[t]))
                    except OSError:
                        pass
                continue
            local, s = by_fd[fd]
            try:
                data, peer = s.recvfrom(2048)
            except OSError:
                continue
            msg = parse_message(data)
            if msg is None or msg[0] != BINDING_REQUEST:
                continue
            src = (peer[0], peer[1])
            change = 0
            if ATTR_CHANGE_REQUEST in msg[2]:
                (change,) = struct.unpack("!I", msg[2][ATTR_CHANGE_REQUEST][:4])
            origin = other(local, change)
            out = udp.get(origin, s)
            try:
                out.sendto(response(msg[1], src, origin), peer)
            except OSError:
                pass


# --- probes ---------------------------------------------------------------------------------------


def bound_socket(bind: str, family: socket.AddressFamily) -> socket.socket:
    host, port = parse_endpoint(bind) if bind else ("", 0)
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    return s


def transact(s: socket.socket, server: Endpoint, change: int, timeout: float) -> Endpoint | None:
    """Send a Binding request (retrying every 200 ms) and return the mapped address, or None."""
    txid, req = binding_request(change)
    deadline = time.monotonic() + timeout
    next_send = 0.0
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None
        if now >= next_send:
            try:
                s.sendto(req, server)
            except OSError:  # no route (link down...): like a lost packet
                pass
            next_send = now + 0.2
        r, _, _ = select.select([s], [], [], max(0.0, min(deadline, next_send) - now))
        if r:
            data, _src = s.recvfrom(2048)
            mapped = mapped_of(data, txid)
            if mapped is not None:
                return mapped


def cmd_probe_mapping(args: argparse.Namespace) -> int:
    servers = [parse_endpoint(x) for x in args.server]
    s = bound_socket(args.bind, family_of(servers[0][0]))
    local = s.getsockname()
    mapped = [transact(s, srv, 0, args.timeout) for srv in servers]
    emit({"local": [local[0], local[1]], "mapped": [list(m) if m else None for m in mapped]})
    return 0


def cmd_probe_filtering(args: argparse.Namespace) -> int:
    """Ask the server to answer from elsewhere, each time followed by a plain (control) request.

    The control answer travels the same path right after the changed one, so once it is in, the
    changed one has either arrived or been dropped; a short grace period covers reordering.
    """
    server = parse_endpoint(args.server)
    s = bound_socket(args.bind, family_of(server[0]))
    mapped = transact(s, server, 0, args.timeout)
    out: dict[str, Any] = {"local": list(s.getsockname()[:2]), "mapped": list(mapped) if mapped else None}
    if mapped is None:  # nothing gets through at all: no point asking for more
        out.update(other_port=False, other_addr=False, other_addr_port=False)
        emit(out)
        return 0
    for name, change in (
        ("other_port", CHANGE_PORT),
        ("other_addr", CHANGE_IP),
        ("other_addr_port", CHANGE_IP | CHANGE_PORT),
    ):
        txid_c, req_c = binding_request(change)
        txid_p, req_p = binding_request(0)
        got_changed = False
        got_control_at: float | None = None
        deadline = time.monotonic() + args.timeout
        next_send = 0.0
        while True:
            now = time.monotonic()
            if got_control_at is not None and (got_changed or now >= got_control_at + args.grace):
                break
            if now >= deadline:
                break
            if got_control_at is None and now >= next_send:
                try:
                    s.sendto(req_c, server)
                    s.sendto(req_p, server)
                except OSError:
                    pass
                next_send = now + 0.3
            wake = deadline if got_control_at is None else got_control_at + args.grace
            if got_control_at is None:
                wake = min(wake, next_send)
            r, _, _ = select.select([s], [], [], max(0.0, wake - now))
            if r:
                data, _src = s.recvfrom(2048)
                if mapped_of(data, txid_c) is not None:
                    got_changed = True
                elif mapped_of(data, txid_p) is not None and got_control_at is None:
                    got_control_at = time.monotonic()
        out[name] = got_changed
        out[name + "_control"] = got_control_at is not None
    emit(out)
    return 0


def cmd_probe_tcp(args: argparse.Namespace) -> int:
    server = parse_endpoint(args.server)
    txid, req = binding_request(0)
    try:
        with socket.create_connection(server, timeout=args.timeout) as c:
            c.sendall(req)
            c.settimeout(args.timeout)
            data = c.recv(2048)
        mapped = mapped_of(data, txid)
        emit({"mapped": list(mapped) if mapped else None, "error": None})
    except OSError as e:
        emit({"mapped": None, "error": f"{type(e).__name__}: {e}"})
    return 0


# --- plain UDP ------------------------------------------------------------------------------------


def cmd_recv(args: argparse.Namespace) -> int:
    host, _ = parse_endpoint(args.bind)
    s = bound_socket(args.bind, family_of(host) if host else socket.AF_INET)
    mapped = transact(s, parse_endpoint(args.stun), 0, 3.0) if args.stun else None
    emit({"ready": list(s.getsockname()[:2]), "mapped": list(mapped) if mapped else None})
    deadline = time.monotonic() + args.timeout
    got = 0
    while got < args.count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if r:
            data, src = s.recvfrom(65535)
            got += 1
            emit({"from": [src[0], src[1]], "data": data.decode(errors="replace")})
            if args.echo:
                s.sendto(data, src)
    emit({"done": got})
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    dest = parse_endpoint(args.to)
    s = bound_socket(args.bind, family_of(dest[0]))
    reply = None
    for _ in range(args.count):
        s.sendto(args.data.encode(), dest)
        if args.wait_reply:
            r, _, _ = select.select([s], [], [], args.wait_reply)
            if r:
                data, src = s.recvfrom(65535)
                reply = {"from": [src[0], src[1]], "data": data.decode(errors="replace")}
                break
    emit({"sent_from": list(s.getsockname()[:2]), "reply": reply})
    return 0


# --- punch ----------------------------------------------------------------------------------------


def cmd_punch(args: argparse.Namespace) -> int:
    stun = parse_endpoint(args.stun)
    s = bound_socket(args.bind, family_of(stun[0]))
    mapped = transact(s, stun, 0, 3.0)
    emit({"mapped": list(mapped) if mapped else None, "local": list(s.getsockname()[:2])})
    line = sys.stdin.readline()
    if not line:
        return 1
    peer = tuple(json.loads(line)["peer"])
    dest = (str(peer[0]), int(peer[1]))
    deadline = time.monotonic() + args.timeout
    got_from: Endpoint | None = None
    peer_got = False
    next_send = 0.0
    while time.monotonic() < deadline and not (got_from and peer_got):
        now = time.monotonic()
        if now >= next_send:
            try:
                s.sendto(b"PUNCH got=%d" % (1 if got_from else 0), dest)
            except OSError:
                pass
            next_send = now + args.interval
        r, _, _ = select.select([s], [], [], max(0.0, min(deadline, next_send) - now))
        if r:
            data, src = s.recvfrom(2048)
            if data.startswith(b"PUNCH"):
                got_from = (src[0], src[1])
                dest = got_from  # answer where the peer's packets really come from
                peer_got = peer_got or data.endswith(b"got=1")
    if got_from:
        for _ in range(3):  # make sure the peer hears that we heard it
            s.sendto(b"PUNCH got=1", dest)
    emit(
        {
            "result": "ok" if got_from and peer_got else ("half" if got_from else "fail"),
            "from": list(got_from) if got_from else None,
        }
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="natlib.testing._agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("stun-server")
    a.add_argument("--address", action="append", required=True)
    a.add_argument("--port", action="append", type=int, required=True)
    a.set_defaults(func=cmd_stun_server)
    a = sub.add_parser("probe-mapping")
    a.add_argument("--bind", default="")
    a.add_argument("--server", action="append", required=True)
    a.add_argument("--timeout", type=float, default=2.0)
    a.set_defaults(func=cmd_probe_mapping)
    a = sub.add_parser("probe-filtering")
    a.add_argument("--bind", default="")
    a.add_argument("--server", required=True)
    a.add_argument("--timeout", type=float, default=2.0)
    a.add_argument("--grace", type=float, default=0.15)
    a.set_defaults(func=cmd_probe_filtering)
    a = sub.add_parser("probe-tcp")
    a.add_argument("--server", required=True)
    a.add_argument("--timeout", type=float, default=2.0)
    a.set_defaults(func=cmd_probe_tcp)
    a = sub.add_parser("recv")
    a.add_argument("--bind", required=True)
    a.add_argument("--count", type=int, default=1)
    a.add_argument("--timeout", type=float, default=5.0)
    a.add_argument("--echo", action="store_true")
    a.add_argument("--stun", default="", help="first learn the socket's public endpoint from this server")
    a.set_defaults(func=cmd_recv)
    a = sub.add_parser("send")
    a.add_argument("--bind", default="")
    a.add_argument("--to", required=True)
    a.add_argument("--data", default="hello")
    a.add_argument("--count", type=int, default=1)
    a.add_argument("--wait-reply", type=float, default=0.0)
    a.set_defaults(func=cmd_send)
    a = sub.add_parser("punch")
    a.add_argument("--bind", default="")
    a.add_argument("--stun", required=True)
    a.add_argument("--timeout", type=float, default=2.0)
    a.add_argument("--interval", type=float, default=0.05)
    a.set_defaults(func=cmd_punch)
    args = p.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        os._exit(130)
