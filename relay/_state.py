"""The routing table: who is connected under which key, who is watching, who must hear PeerGone.

Rules (spec §5), all enforced here and nowhere else:

- **One key, many connections.** Every connection for a key is kept open and read. Exactly one is
  *active* and receives packets: a newly registered connection becomes active, and any frame read
  on an inactive duplicate makes that one active ("last writer is active"). When the active one
  leaves while two or more remain, none is active until one of them speaks; packets meanwhile drop
  as ``dup_client``. When one connection is left it is normal again.
- **Lookups** on the hot path are one dict access: ``active.get(dst)``.
- **PeerGone(Disconnected)** goes to every connection that was ever written a packet from X, and to
  every watcher, when X goes from one connection to none. Closing one of several duplicates sends
  nothing.
- **Watchers** (mesh peers that sent WatchConns) get PeerPresent for every new *local*
  connection, duplicates included, and PeerGone under the same 1→0 rule, so the two do not pair up
  1:1. Keys known only through other relays are never announced: forwarding is one hop.
- **Forwarders** (regional mesh): a key not connected here may be present on other relays of the
  region. The first relay that announced it is used; later announcers are kept in order and take
  over when it goes. A local connection always wins over a forwarder.
- **Gone from the region**: receivers hear PeerGone(Disconnected) for X when X's last local
  connection closes and no relay of the region has it, or when the last forwarder for X goes and X
  is not connected here.
- **Sibling workers** (``-workers N``, see ``_workers``): the N processes of one relay link to each
  other over loopback. A sibling link is not a client: it is kept apart from ``sets`` (no
  PeerPresent for it, not counted, not drained). Sibling watchers get this worker's local
  connections only. Sibling forwarders come before other relays' for the same key, and
  *external* watchers (other relays of the region) see the whole worker group: keys learned from
  siblings are announced to them, and PeerGone goes to them only when a key has left every
  worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from natlib.derp import PeerGoneReason

from ._stats import RelayStats

if TYPE_CHECKING:
    from ._mesh import MeshPeer
    from ._sclient import ClientConn

__all__ = ["ClientSet", "RoutingTable"]


class ClientSet:
    """All connections of one node key, in registration order."""

    __slots__ = ("active", "conns")

    def __init__(self, first: ClientConn) -> None:
        self.conns: list[ClientConn] = [first]
        self.active: ClientConn | None = first

    @property
    def is_dup(self) -> bool:
        return len(self.conns) > 1


class RoutingTable:
    def __init__(self, stats: RelayStats) -> None:
        self.stats = stats
        self.sets: dict[bytes, ClientSet] = {}
        self.active: dict[bytes, ClientConn] = {}
        self.watchers: set[ClientConn] = set()  # other relays of the region (WatchConns)
        self.forwarders: dict[bytes, list[MeshPeer]] = {}
        self.sibling_links: set[ClientConn] = set()  # incoming links from sibling workers
        self.sibling_watchers: set[ClientConn] = set()
        self._empty: trio.Event | None = None
        self._receivers_of: dict[bytes, set[ClientConn]] = {}

    # -- registration ----------------------------------------------------------------------------

    def register(self, conn: ClientConn) -> None:
        """Add a connection that finished its handshake; it becomes the active one for its key."""
        key = conn.key
        cs = self.sets.get(key)
        if cs is None:
            self.sets[key] = ClientSet(conn)
        else:
            if not cs.is_dup:
                self.stats.current_dup_client_keys += 1
                self.stats.current_dup_client_conns += 1  # the one already there
            cs.conns.append(conn)
            cs.active = conn
            self.stats.current_dup_client_conns += 1
            self.stats.total_dup_client_conns += 1
        self.active[key] = conn
        self.stats.current_connections += 1
        for w in self.watchers:
            w.queue_peer_present(conn)
        for w in self.sibling_watchers:
            w.queue_peer_present(conn)

    def add_sibling_link(self, conn: ClientConn) -> None:
        """Track a link from a sibling worker: a mesh connection that is not a client."""
        self.sibling_links.add(conn)

    def unregister(self, conn: ClientConn) -> None:
        if conn in self.sibling_links:
            self.sibling_links.discard(conn)
            self.sibling_watchers.discard(conn)
            return
        key = conn.key
        cs = self.sets.get(key)
        if cs is None or conn not in cs.conns:
            return
        self.stats.current_connections -= 1
        if self.stats.current_connections == 0 and self._empty is not None:
            self._empty.set()
        if conn.is_home:
            self.stats.current_home_connections -= 1
        self.watchers.discard(conn)
        self.stats.watchers = len(self.watchers)
        for src in conn.received_from:
            receivers = self._receivers_of.get(src)
            if receivers is not None:
                receivers.discard(conn)
                if not receivers:
                    del self._receivers_of[src]
        was_dup = cs.is_dup
        cs.conns.remove(conn)
        if was_dup:
            self.stats.current_dup_client_conns -= 1
            if not cs.is_dup:
                self.stats.current_dup_client_keys -= 1
                self.stats.current_dup_client_conns -= 1
        if not cs.conns:
            del self.sets[key]
            self.active.pop(key, None)
            for w in self.sibling_watchers:
                w.queue_peer_gone(key, PeerGoneReason.DISCONNECTED)
            if self.sibling_forwarder_for(key) is None:  # gone from every worker of this relay
                for w in self.watchers:
                    w.queue_peer_gone(key, PeerGoneReason.DISCONNECTED)
            if key not in self.forwarders:
                self._peer_gone_from_region(key)
            return
        if len(cs.conns) == 1:
            cs.active = cs.conns[0]
            self.active[key] = cs.active
        elif cs.active is conn:
            cs.active = None
            self.active.pop(key, None)

    async def wait_empty(self) -> None:
        """Return once no client connection is registered (used while draining)."""
        if self.stats.current_connections == 0:
            await trio.lowlevel.checkpoint()
            return
        if self._empty is None or self._empty.is_set():
            self._empty = trio.Event()
        await self._empty.wait()

    def note_activity(self, conn: ClientConn) -> None:
        """A frame arrived on ``conn``: under last-writer-is-active it takes over its key."""
        cs = self.sets.get(conn.key)
        if cs is not None and cs.active is not conn and conn in cs.conns:
            cs.active = conn
            self.active[conn.key] = conn

    def is_active(self, conn: ClientConn) -> bool:
        return self.active.get(conn.key) is conn

    # -- routing ---------------------------------------------------------------------------------

    def drop_reason(self, dst: bytes) -> str:
        """Why a packet to ``dst`` cannot be delivered locally."""
        cs = self.sets.get(dst)
        if cs is not None and cs.is_dup:
            return "dup_client"
        return "unknown_dest"

    def note_delivered(self, receiver: ClientConn, src: bytes) -> None:
        """``receiver`` was written a packet from ``src``: it will hear PeerGone when src goes."""
        receiver.received_from.add(src)
        self._receivers_of.setdefault(src, set()).add(receiver)

    # -- watchers (mesh) -------------------------------------------------------------------------

    def add_watcher(self, conn: ClientConn) -> None:
        """Subscribe ``conn`` and queue a PeerPresent snapshot of every connected key.

        A sibling worker's link gets this worker's connections; another relay's gets the clients of
        every worker of this relay.
        """
        if conn in self.sibling_links:
            if conn not in self.sibling_watchers:
                self.sibling_watchers.add(conn)
                self._snapshot_to(conn)
            return
        if conn in self.watchers:
            return
        self.watchers.add(conn)
        self.stats.watchers = len(self.watchers)
        self._snapshot_to(conn)
        for key, peers in self.forwarders.items():
            if key in self.sets:
                continue
            frame = peers[0].present_frames.get(key) if peers[0].is_sibling else None
            if frame is not None:
                conn.queue_control(frame)

    def _snapshot_to(self, conn: ClientConn) -> None:
        for cs in self.sets.values():
            shown = cs.active if cs.active is not None else cs.conns[-1]
            conn.queue_peer_present(shown)

    def connections_of(self, key: bytes) -> list[ClientConn]:
        cs = self.sets.get(key)
        return list(cs.conns) if cs is not None else []

    def _peer_gone_from_region(self, key: bytes) -> None:
        for receiver in self._receivers_of.pop(key, ()):
            receiver.received_from.discard(key)
            receiver.queue_peer_gone(key, PeerGoneReason.DISCONNECTED)

    # -- forwarders (regional mesh) --------------------------------------------------------------

    def forwarder_for(self, dst: bytes) -> MeshPeer | None:
        """The relay to forward to, if ``dst`` has no local connection at all."""
        if dst in self.sets:
            return None
        peers = self.forwarders.get(dst)
        return peers[0] if peers else None

    def sibling_forwarder_for(self, dst: bytes) -> MeshPeer | None:
        """The sibling worker that has ``dst``, if this worker has no connection for it."""
        if dst in self.sets:
            return None
        peers = self.forwarders.get(dst)
        return peers[0] if peers and peers[0].is_sibling else None

    def add_forwarder(self, key: bytes, peer: MeshPeer, present_frame: bytes | None = None) -> None:
        """``key`` is reachable through ``peer``. From a sibling, ``present_frame`` (its PeerPresent)
        is passed on to the other relays watching this one: they see the whole worker group."""
        if peer.is_sibling and present_frame is not None:
            for w in self.watchers:
                w.queue_control(present_frame)
        peers = self.forwarders.setdefault(key, [])
        if peer in peers:
            return  # re-registering is ignored
        if peer.is_sibling:  # one loopback hop beats a hop to another relay
            at = next((i for i, p in enumerate(peers) if not p.is_sibling), len(peers))
            peers.insert(at, peer)
        else:
            peers.append(peer)
        if len(peers) == 2:
            self.stats.multiforwarder_created += 1

    def remove_forwarder(self, key: bytes, peer: MeshPeer) -> None:
        peers = self.forwarders.get(key)
        if not peers or peer not in peers:
            self.stats.packet_forwarder_delete_other_value += 1
            return
        peers.remove(peer)
        if len(peers) == 1:
            self.stats.multiforwarder_deleted += 1
        if peer.is_sibling and key not in self.sets and not any(p.is_sibling for p in peers):
            for w in self.watchers:  # gone from every worker of this relay
                w.queue_peer_gone(key, PeerGoneReason.DISCONNECTED)
        if not peers:
            del self.forwarders[key]
            if key not in self.sets:
                self._peer_gone_from_region(key)
