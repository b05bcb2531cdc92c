"""A client's bounded send queue with derper's drop-oldest policy.

Each client has two of these: one for ordinary packets and one for disco packets, so a flood of
data cannot push out path-discovery traffic. The reader that produces into a queue never blocks:
when the queue is over depth, the oldest entries are dropped (``queue_head``).

Depth is counted in *entries* (derper: 32 packets). An entry is one packet, or a run of packets
that arrived back to back from one sender for one destination within a single read, which the
relay hands over with a single copy. For interactive traffic every entry is one packet and this
is exactly derper's policy. For a streaming sender, counting packets would be wrong on a single
thread: when the sender's reader happens to be scheduled twice before the receiver's writer, a
whole read (hundreds of small packets) would be evicted although the receiver keeps up. Counting
entries drops only when the receiver's writer really falls 32 reads behind. Memory stays bounded
as in derper: one read is at most 64 KiB, so a queue holds at most 32 × 64 KiB.
"""

from __future__ import annotations

from collections import deque
from typing import Final, NamedTuple

__all__ = ["DEFAULT_QUEUE_DEPTH", "PacketQueue", "QueueEntry"]

DEFAULT_QUEUE_DEPTH: Final = 32


class QueueEntry(NamedTuple):
    frames: bytes  # one or more encoded RecvPacket frames
    packets: int  # how many frames
    payload_bytes: int  # sum of packet lengths, for byte counters
    src: bytes  # the sender's node key (one sender per run)
    enqueued_at: float


class PacketQueue:
    __slots__ = ("_entries", "depth", "packets")

    def __init__(self, depth: int = DEFAULT_QUEUE_DEPTH) -> None:
        self._entries: deque[QueueEntry] = deque()
        self.depth = depth
        self.packets = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: QueueEntry) -> list[QueueEntry]:
        """Append ``entry``; return the entries evicted from the head to stay within depth."""
        self._entries.append(entry)
        self.packets += entry.packets
        evicted: list[QueueEntry] = []
        while len(self._entries) > self.depth:
            old = self._entries.popleft()
            self.packets -= old.packets
            evicted.append(old)
        return evicted

    def take_all(self) -> list[QueueEntry]:
        out = list(self._entries)
        self._entries.clear()
        self.packets = 0
        return out
