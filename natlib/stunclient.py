"""STUN Binding client: many transactions over one socket, sans-io core plus anyio helpers.

:class:`StunClient` is the sans-io core. It owns no socket and no clock: the caller starts
transactions with :meth:`StunClient.start`, sends what :meth:`StunClient.datagrams_to_send`
hands out, feeds every datagram received on the socket to :meth:`StunClient.receive_datagram`
and collects timeouts with :meth:`StunClient.expired`, sleeping until
:meth:`StunClient.next_deadline` in between. Any number of servers (v4 and v6) can be probed at
once; replies are matched by transaction ID *and* source address, so the same socket can carry
other traffic (disco, WireGuard): :meth:`~StunClient.receive_datagram` returns ``None`` for
anything that is not an answer to one of our requests, and the caller handles it as its own.

Retransmission follows Tailscale's netcheck rather than RFC 5389's 39.5 s back-off: by default
requests go out at 0, 100 and 200 ms and the transaction fails after 3 s (nat-traversal §2.2).
Each send of one transaction carries a fresh transaction ID (the first one names the
transaction), so an answer tells which send it belongs to and the RTT is unambiguous.

The wire format (Tailscale's Binding Request with SOFTWARE ``tailnode`` and FINGERPRINT, and the
tolerant response parser) comes from :mod:`natlib.stun`.

:func:`stun_binding` and :func:`stun_probe` are thin anyio drivers around the core; they run
under trio and asyncio. Cancelling either abandons the outstanding transactions (late replies
land on a closed socket, or, for a caller-supplied socket, are left for the caller's reader).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

import anyio
import anyio.abc

from .stun import (
    HEADER_LEN,
    MAGIC_COOKIE,
    NETCHECK_RETRANSMIT_SCHEDULE,
    NETCHECK_STUN_TIMEOUT,
    StunError,
    StunParseError,
    StunTimeoutError,
    UnexpectedMessageError,
    canonical_ip,
    new_transaction_id,
    parse_binding_response,
    retransmit_schedule,
    tailscale_binding_request,
)

__all__ = [
    "MAX_PENDING",
    "Endpoint",
    "StunClient",
    "StunResult",
    "StunTimeoutError",
    "drive",
    "stun_binding",
    "stun_probe",
]

log = logging.getLogger(__name__)

Endpoint: TypeAlias = tuple[str, int]
"""A numeric IP address as text (IPv4 unmapped, no IPv6 scope) and a port."""

MAX_PENDING: Final = 4096
"""At most this many transactions in flight per client; :meth:`StunClient.start` refuses more."""

ERROR_TIMEOUT: Final = "timeout"
_RECV_BUFFER: Final = 2048  # a Binding response is 32 or 44 bytes; anything big is not ours
_COOKIE: Final = MAGIC_COOKIE.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class StunResult:
    """The outcome of one Binding transaction to one server."""

    server: Endpoint
    """The server as given to :meth:`StunClient.start` (canonical form)."""
    mapped: Endpoint | None
    """The reflexive address the server saw; None when the transaction failed."""
    rtt: float | None
    """Seconds from the answered send to its answer; None when the transaction failed."""
    error: str | None
    """None on success; ``"timeout"``, ``"cancelled"``, ``"send failed: ..."`` or a server error."""
    sends: int = 0
    """How many requests had gone out when the transaction ended."""
    txid: bytes = b""
    """The transaction ID :meth:`StunClient.start` returned."""


def _canonical_endpoint(endpoint: Endpoint) -> Endpoint:
    host, port = endpoint
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return str(canonical_ip(host)), int(port)


def _transaction_id_of(data: bytes) -> bytes | None:
    """The TxID field of a datagram that could be STUN (cheap pre-filter before full parsing)."""
    if len(data) < HEADER_LEN or data[4:8] != _COOKIE:
        return None
    return data[8:HEADER_LEN]


@dataclass(slots=True)
class _Transaction:
    txid: bytes
    server: Endpoint
    send_times: tuple[float, ...]
    deadline: float
    sent: dict[bytes, float] = field(default_factory=dict)  # txid of each send -> when it was due

    @property
    def next_send(self) -> float | None:
        n = len(self.sent)
        return self.send_times[n] if n < len(self.send_times) else None


class StunClient:
    """Sans-io state for concurrent STUN Binding transactions sharing one socket.

    Times are floats in the caller's clock (e.g. ``anyio.current_time()``). A transaction ends
    exactly once: with a result from :meth:`receive_datagram`, a timeout from :meth:`expired`,
    or :meth:`cancel`. Nothing here raises on received data.
    """

    def __init__(self) -> None:
        self._transactions: dict[bytes, _Transaction] = {}
        self._by_send_txid: dict[bytes, _Transaction] = {}

    @property
    def pending(self) -> int:
        """Transactions started and not yet ended."""
        return len(self._transactions)

    def start(
        self,
        server: Endpoint,
        now: float,
        *,
        schedule: Sequence[float] = NETCHECK_RETRANSMIT_SCHEDULE,
        timeout: float = NETCHECK_STUN_TIMEOUT,
    ) -> bytes:
        """Begin a Binding transaction to ``server`` (numeric IP, port); return its transaction ID.

        Requests are due at ``now + offset`` for each offset of ``schedule``; without an answer
        the transaction times out at ``now + timeout``. Raises :class:`ValueError` for a
        non-numeric host, a bad port or schedule, a non-positive timeout, or more than
        :data:`MAX_PENDING` transactions.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if len(self._transactions) >= MAX_PENDING:
            raise ValueError(f"more than {MAX_PENDING} STUN transactions in flight")
        tx = _Transaction(
            txid=new_transaction_id(),
            server=_canonical_endpoint(server),
            send_times=retransmit_schedule(now, schedule),
            deadline=now + timeout,
        )
        self._transactions[tx.txid] = tx
        return tx.txid

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Requests due at ``now`` that were not handed out yet, with their destinations.

        A send whose time falls after the transaction's deadline is never handed out.
        """
        out: list[tuple[bytes, Endpoint]] = []
        for tx in self._transactions.values():
            while (due := tx.next_send) is not None and due <= now and due < tx.deadline:
                send_txid = tx.txid if not tx.sent else new_transaction_id()
                tx.sent[send_txid] = now  # when actually handed out: a late driver must not inflate the RTT
                self._by_send_txid[send_txid] = tx
                out.append((tailscale_binding_request(send_txid), tx.server))
        return out

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> StunResult | None:
        """Feed one datagram received on the socket; return a result if it ends a transaction.

        Returns None for anything that is not a well-formed Binding response from the server of
        one of our live transactions carrying one of its transaction IDs: other traffic,
        garbage, truncated messages, wrong or late transaction IDs, spoofed sources. A Binding
        *error* response from the right server ends the transaction with that error.
        """
        send_txid = _transaction_id_of(bytes(data))
        if send_txid is None:
            return None
        tx = self._by_send_txid.get(send_txid)
        if tx is None:
            return None
        try:
            if _canonical_endpoint(source) != tx.server:
                return None
        except ValueError:
            return None
        try:
            mapped = parse_binding_response(data, send_txid)
        except UnexpectedMessageError as e:
            if "error response" not in str(e):
                return None  # e.g. a Binding request echoed back: not an answer
            return self._finish(tx, None, None, f"server error: {e}")
        except StunParseError as e:
            log.debug("ignoring malformed STUN reply from %s:%d: %s", *source, e)
            return None
        return self._finish(tx, mapped, max(0.0, now - tx.sent[send_txid]), None)

    def expired(self, now: float) -> list[StunResult]:
        """End and return the transactions whose deadline is at or before ``now`` (``"timeout"``)."""
        late = [tx for tx in self._transactions.values() if tx.deadline <= now]
        return [self._finish(tx, None, None, ERROR_TIMEOUT) for tx in late]

    def fail(self, txid: bytes, error: str) -> StunResult | None:
        """End a transaction with ``error`` (e.g. the driver's send failed); None if not live.

        ``txid`` is the transaction's ID or that of any of its sends, so a driver whose
        ``sendto`` failed can pass ``datagram[8:20]``.
        """
        tx = self._transactions.get(txid) or self._by_send_txid.get(txid)
        return None if tx is None else self._finish(tx, None, None, error)

    def cancel(self, txid: bytes) -> None:
        """Forget a transaction; later replies to it are not ours. Unknown IDs are ignored."""
        tx = self._transactions.get(txid)
        if tx is not None:
            self._finish(tx, None, None, "cancelled")

    def next_deadline(self) -> float | None:
        """The earliest time a send is due or a transaction expires; None with nothing pending."""
        times = [tx.deadline for tx in self._transactions.values()]
        times += [t for tx in self._transactions.values() if (t := tx.next_send) is not None]
        return min(times, default=None)

    def server_of(self, txid: bytes) -> Endpoint | None:
        """The server of a live transaction, or None."""
        tx = self._transactions.get(txid)
        return None if tx is None else tx.server

    def _finish(
        self, tx: _Transaction, mapped: Endpoint | None, rtt: float | None, error: str | None
    ) -> StunResult:
        del self._transactions[tx.txid]
        for send_txid in tx.sent:
            self._by_send_txid.pop(send_txid, None)
        return StunResult(
            server=tx.server, mapped=mapped, rtt=rtt, error=error, sends=len(tx.sent), txid=tx.txid
        )


# -- anyio drivers ---------------------------------------------------------------------------------


def _family_of(host: str) -> Literal[socket.AddressFamily.AF_INET, socket.AddressFamily.AF_INET6]:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


async def drive(
    client: StunClient, sockets: Mapping[socket.AddressFamily, anyio.abc.UDPSocket]
) -> list[StunResult]:
    """Run ``client`` over ``sockets`` (one per address family) until nothing is pending.

    Returns every transaction's result in the order they ended. Datagrams that are not ours are
    dropped (logged at debug level), so the sockets must not carry other traffic meanwhile.
    Send errors end the transaction concerned with ``"send failed: ..."``; receive errors are
    ignored. Cancellation leaves the remaining transactions pending in ``client``.
    """
    results: list[StunResult] = []
    woken = anyio.Event()

    async def receive(sock: anyio.abc.UDPSocket) -> None:
        while True:
            try:
                data, source = await sock.receive()
            except OSError as e:  # e.g. a queued ICMP error; the socket itself stays usable
                log.debug("STUN receive error (ignored): %s", e)
                continue
            result = client.receive_datagram(data, (source[0], source[1]), anyio.current_time())
            if result is None:
                log.debug(
                    "dropping %d-byte datagram from %s:%d: not a STUN answer of ours", len(data), *source
                )
                continue
            results.append(result)
            woken.set()

    async with anyio.create_task_group() as tg:
        for sock in sockets.values():
            tg.start_soon(receive, sock)
        while client.pending:
            now = anyio.current_time()
            results.extend(client.expired(now))
            for data, (host, port) in client.datagrams_to_send(now):
                out_sock = sockets.get(_family_of(host))
                error = "no socket for this address family"
                if out_sock is not None:
                    try:
                        await out_sock.sendto(data, host, port)
                        continue
                    except OSError as e:
                        error = f"send failed: {e.strerror or e}"
                failed = client.fail(data[8:HEADER_LEN], error)
                if failed is not None:
                    results.append(failed)
            deadline = client.next_deadline()
            if deadline is None:
                break
            with anyio.move_on_at(deadline):
                await woken.wait()
            woken = anyio.Event()
        tg.cancel_scope.cancel()
    return results


async def stun_probe(
    servers: Sequence[Endpoint],
    *,
    sock: anyio.abc.UDPSocket | None = None,
    local_host: str | None = None,
    local_port: int = 0,
    timeout: float = NETCHECK_STUN_TIMEOUT,  # noqa: ASYNC109 - the STUN transaction's own deadline
    schedule: Sequence[float] = NETCHECK_RETRANSMIT_SCHEDULE,
) -> list[StunResult]:
    """Send Binding requests to every server at once; return one result per server, in order.

    All servers of one address family share one socket, so behind an endpoint-independent NAT
    the mapped addresses agree and behind a hard NAT they differ. With ``sock`` given it is used
    for the servers of its family (and must not be read by anyone else meanwhile); otherwise one
    socket per needed family is bound to ``local_host``/``local_port`` (default: any address, an
    ephemeral port) and closed on return. Servers no socket can reach get the error ``"no socket
    for this address family"``; a failed send gives ``"send failed: ..."``. Raises
    :class:`ValueError` for a server that is not a numeric IP and port. Cancellation abandons
    every transaction and closes the sockets this call opened.
    """
    client = StunClient()
    now = anyio.current_time()
    txids = [client.start(server, now, schedule=schedule, timeout=timeout) for server in servers]
    families = {_family_of(server[0]) for server in servers}
    sockets: dict[socket.AddressFamily, anyio.abc.UDPSocket] = {}
    async with AsyncExitStack() as stack:
        if sock is not None:
            sockets[sock.extra(anyio.abc.SocketAttribute.family)] = sock
        else:
            for family in sorted(families):
                if local_host is not None and _family_of(local_host) != family:
                    continue
                try:
                    opened = await anyio.create_udp_socket(
                        family=family, local_host=local_host, local_port=local_port
                    )
                except OSError as e:  # e.g. no IPv6 on this host
                    log.debug("cannot open a %s STUN socket: %s", family.name, e)
                    continue
                sockets[family] = await stack.enter_async_context(opened)
        by_txid = {result.txid: result for result in await drive(client, sockets)}
    return [by_txid[txid] for txid in txids]


def _format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def stun_binding(
    server: Endpoint,
    *,
    sock: anyio.abc.UDPSocket | None = None,
    timeout: float = NETCHECK_STUN_TIMEOUT,  # noqa: ASYNC109 - the STUN transaction's own deadline
) -> Endpoint:
    """Ask one STUN server for our reflexive address; return it as (ip, port).

    Sends at 0, 100 and 200 ms. Raises :class:`natlib.stun.StunTimeoutError` naming the server
    and the number of tries when nothing valid came back within ``timeout`` seconds,
    :class:`natlib.stun.StunError` when the server answered with an error, and
    :class:`OSError` when the request could not be sent.
    See :func:`stun_probe` for ``sock`` and for what cancellation does.
    """
    (result,) = await stun_probe([server], sock=sock, timeout=timeout)
    if result.mapped is not None:
        return result.mapped
    where = _format_endpoint(result.server)
    if result.error == ERROR_TIMEOUT:
        raise StunTimeoutError(
            f"no STUN Binding response from {where} after {result.sends} tries in {timeout:g} s"
        )
    if result.error is not None and result.error.startswith("server error"):
        raise StunError(f"STUN server {where} refused the Binding request ({result.error})")
    raise OSError(f"STUN Binding request to {where} failed: {result.error}")
