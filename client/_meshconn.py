"""The part of natlib's connection object the client uses, as structural types.

``natlib.open_conn`` yields a connection that carries WireGuard datagrams to peers by node key, over
a direct UDP path or a relay, and reports the path it uses. The client depends only on the methods
below, so tests can drive the proxies and the daemon with an in-memory connection of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

from natlib.keys import DiscoPublicKey, NodePublicKey

__all__ = ["BurstReceiver", "BurstSender", "DatagramConn", "MeshConn", "PathView", "PingView"]


class PathView(Protocol):
    """natlib's ``PathInfo``: how datagrams to one peer travel now."""

    @property
    def kind(self) -> str:
        """``"relay"``, ``"direct"`` or ``"both"`` (direct confirmed, relay still open)."""
        ...

    @property
    def address(self) -> Any:
        """The peer's direct UDP address, or None on the relay."""
        ...

    @property
    def rtt(self) -> float | None: ...

    @property
    def region(self) -> int | None: ...


class PingView(Protocol):
    """natlib's ``PingResult``: one disco pong."""

    @property
    def kind(self) -> str: ...

    @property
    def address(self) -> Any: ...

    @property
    def rtt(self) -> float: ...


class DatagramConn(Protocol):
    """What the loopback proxies need: send to a peer, receive from any peer."""

    async def send(self, node_key: NodePublicKey, datagram: bytes) -> None: ...

    async def receive(self) -> tuple[NodePublicKey, bytes]: ...


@runtime_checkable
class BurstReceiver(Protocol):
    """A connection that can also hand over what is already waiting without awaiting (natlib's
    ``Conn.receive_nowait``): the proxies drain a burst per wake-up with it."""

    def receive_nowait(self) -> tuple[NodePublicKey, bytes] | None: ...


@runtime_checkable
class BurstSender(Protocol):
    """A connection that can also take several datagrams for one peer in one call (natlib's
    ``Conn.send_many``, which sends runs of them in one system call): the proxies hand it what
    one wake-up read from the engine."""

    async def send_many(self, node_key: NodePublicKey, datagrams: Sequence[bytes]) -> None: ...


class MeshConn(DatagramConn, Protocol):
    """What the daemon needs on top: peers, their paths, disco pings and counters."""

    def add_peer(
        self,
        node_key: NodePublicKey,
        disco_key: DiscoPublicKey,
        home_region: int,
        endpoints: Sequence[Any] = (),
    ) -> None: ...

    def remove_peer(self, node_key: NodePublicKey) -> None: ...

    def path(self, node_key: NodePublicKey) -> PathView: ...

    def path_events(self) -> AsyncIterator[tuple[NodePublicKey, PathView]]: ...

    async def ping(self, node_key: NodePublicKey, timeout: float = 5.0) -> PingView: ...  # noqa: ASYNC109

    def stats(self) -> dict[str, Any]: ...
