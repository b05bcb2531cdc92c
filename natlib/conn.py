"""natlib's connection object: datagrams to peers by node key, direct when possible, relayed otherwise.

::

    import natlib.conn

    async with natlib.conn.open_conn(node_key, disco_key, derp_map) as conn:
        conn.add_peer(peer_node_key, peer_disco_key, home_region=1, endpoints=[("203.0.113.7", 41641)])
        await conn.send(peer_node_key, b"datagram")       # relay first, direct once disco finds a path
        await conn.send_many(peer_node_key, burst)        # a batch: equal sizes leave in one syscall
        src, data = await conn.receive()
        print(conn.path(peer_node_key))                   # PathInfo(kind='direct', address=(...), ...)

It runs under trio and asyncio (anyio). How it works, and what cancellation does: see
:class:`Conn` and :func:`open_conn`.
"""

from ._conn import (
    DERP_IDLE_CLOSE,
    DERP_QUEUE_LEN,
    RECEIVE_QUEUE_LEN,
    RELAY_PLACEHOLDER_IP,
    Conn,
    ConnClosedError,
    PathInfo,
    PingResult,
    PingTimeoutError,
    UnknownPeerError,
    open_conn,
)

__all__ = [
    "DERP_IDLE_CLOSE",
    "DERP_QUEUE_LEN",
    "RECEIVE_QUEUE_LEN",
    "RELAY_PLACEHOLDER_IP",
    "Conn",
    "ConnClosedError",
    "PathInfo",
    "PingResult",
    "PingTimeoutError",
    "UnknownPeerError",
    "open_conn",
]
