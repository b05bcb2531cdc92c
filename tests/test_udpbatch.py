"""natlib.udpbatch: which datagrams share a segmented send, and real GSO/GRO sockets on loopback."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from natlib.udpbatch import (
    GRO_ANCILLARY_SIZE,
    MAX_RUN_BYTES,
    MAX_SEGMENTS,
    BatchSender,
    enable_gro,
    plan_runs,
    split_coalesced,
)

WG = 1312  # a full WireGuard data datagram at MTU 1280


def test_equal_sizes_form_one_run() -> None:
    assert plan_runs([WG] * 10) == [(0, 10)]


def test_a_shorter_datagram_ends_a_run_and_a_longer_one_starts_a_new_one() -> None:
    assert plan_runs([WG, WG, 92, WG, WG, 1400, 1400]) == [(0, 3), (3, 5), (5, 7)]


def test_runs_are_capped_by_segments_and_bytes() -> None:
    assert plan_runs([100] * (MAX_SEGMENTS + 3)) == [(0, MAX_SEGMENTS), (MAX_SEGMENTS, MAX_SEGMENTS + 3)]
    per_run = MAX_RUN_BYTES // WG  # 48 full datagrams fit in one run
    assert plan_runs([WG] * 100) == [(0, per_run), (per_run, 2 * per_run), (2 * per_run, 100)]


def test_empty_and_zero_length_datagrams_go_alone() -> None:
    assert plan_runs([]) == []
    assert plan_runs([0, 0, WG]) == [(0, 1), (1, 2), (2, 3)]


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.fixture
def sender_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    yield sock
    sock.close()


def _batch(count: int, size: int = WG, last: int | None = None) -> list[bytes]:
    out = [bytes([i % 251]) * size for i in range(count)]
    if last is not None:
        out.append(b"\xee" * last)
    return out


def test_a_segmented_batch_arrives_as_the_same_datagrams(
    receiver: socket.socket, sender_socket: socket.socket
) -> None:
    sender = BatchSender(sender_socket)
    if not sender.gso:
        pytest.skip("this kernel has no UDP_SEGMENT (Linux >= 4.18)")
    batch = _batch(60, last=92)  # two runs (48 + 13 with the short tail)
    assert sender.send(batch, receiver.getsockname()) == (0, None)
    assert (sender.segmented_sends, sender.plain_sends) == (2, 0)
    # A receiver without GRO gets every datagram on its own, in order.
    assert [receiver.recv(65535) for _ in batch] == batch


def test_a_gro_receiver_gets_runs_back_and_splits_them(
    receiver: socket.socket, sender_socket: socket.socket
) -> None:
    if not enable_gro(receiver) or not BatchSender(sender_socket).gso:
        pytest.skip("this kernel has no UDP_GRO / UDP_SEGMENT (Linux >= 5.0)")
    batch = _batch(20, last=100)
    assert BatchSender(sender_socket).send(batch, receiver.getsockname()) == (0, None)
    got: list[bytes] = []
    reads = 0
    while len(got) < len(batch):
        data, ancillary, _, _ = receiver.recvmsg(65535, GRO_ANCILLARY_SIZE)
        reads += 1
        got += split_coalesced(data, ancillary)
    assert got == batch
    assert reads < len(batch)  # coalesced on the way (one read over loopback)


def test_without_gso_every_datagram_is_its_own_send(
    receiver: socket.socket, sender_socket: socket.socket
) -> None:
    sender = BatchSender(sender_socket, gso=False)
    batch = _batch(5)
    assert sender.send(batch, receiver.getsockname()) == (0, None)
    assert (sender.segmented_sends, sender.plain_sends) == (0, 5)
    assert [receiver.recv(65535) for _ in batch] == batch


def test_split_without_a_segment_size_is_one_datagram() -> None:
    assert split_coalesced(b"abc", []) == [b"abc"]
    gro = (socket.SOL_UDP, 104, (2).to_bytes(4, "little"))
    assert split_coalesced(b"aabbc", [gro]) == [b"aa", b"bb", b"c"]
    assert split_coalesced(b"aa", [gro]) == [b"aa"]


class _RefusingSocket:
    """A socket whose kernel refuses segmentation the way a device without checksum offload
    does (EIO on the segmented sendmsg); plain sends go to a real socket."""

    def __init__(self, real: socket.socket, segmented_errno: int) -> None:
        self.real = real
        self.segmented_errno = segmented_errno
        self.segmented_attempts = 0

    def sendmsg(self, buffers: Sequence[bytes], ancillary: Any, flags: int, address: Any) -> int:
        self.segmented_attempts += 1
        raise OSError(self.segmented_errno, "refused")

    def sendto(self, data: bytes, address: Any) -> int:
        return self.real.sendto(data, address)


def test_a_refused_segmented_send_falls_back_for_good_and_loses_nothing(
    receiver: socket.socket, sender_socket: socket.socket
) -> None:
    refusing = _RefusingSocket(sender_socket, errno.EIO)
    sender = BatchSender(refusing, gso=True)  # type: ignore[arg-type]
    first, second = _batch(10), _batch(10, size=600)
    assert sender.send(first, receiver.getsockname()) == (0, None)
    assert sender.send(second, receiver.getsockname()) == (0, None)
    assert refusing.segmented_attempts == 1 and sender.gso is False
    assert sender.plain_sends == 20
    assert [receiver.recv(65535) for _ in range(20)] == first + second


def test_another_error_stops_the_batch_and_counts_the_rest(
    receiver: socket.socket, sender_socket: socket.socket
) -> None:
    sender = BatchSender(_RefusingSocket(sender_socket, errno.ENETUNREACH), gso=True)  # type: ignore[arg-type]
    unsent, error = sender.send(_batch(10), receiver.getsockname())
    assert unsent == 10 and isinstance(error, OSError) and error.errno == errno.ENETUNREACH
    assert sender.gso is True  # not a reason to stop segmenting
