"""The UAPI driver: one request and its reply over a wireguard-go UNIX socket (anyio)."""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

import anyio

from ..uapi import NEED_DATA, DeviceStats, ReplyReader, SetAccepted, SetRequest, encode_get, encode_set
from ._base import EngineError

__all__ = ["UAPI_TIMEOUT", "uapi_get", "uapi_set"]

#: wireguard-go answers in microseconds; a request still unanswered after this is a hung engine.
UAPI_TIMEOUT: Final = 5.0
_RECEIVE_SIZE: Final = 65536


async def _transact(
    socket_path: Path, request: bytes, operation: Literal["get", "set"]
) -> DeviceStats | SetAccepted:
    # One operation per connection: after a failed set the engine leaves the rest unread.
    reader = ReplyReader(operation)
    try:
        with anyio.fail_after(UAPI_TIMEOUT):
            stream = await anyio.connect_unix(socket_path)
            async with stream:
                await stream.send(request)
                while True:
                    event = reader.next_event()
                    if event is not NEED_DATA:
                        assert isinstance(event, DeviceStats | SetAccepted)
                        return event
                    try:
                        data = await stream.receive(_RECEIVE_SIZE)
                    except anyio.EndOfStream:
                        data = b""
                    reader.receive_data(data)
    except TimeoutError:
        raise EngineError(f"UAPI {operation} on {socket_path}: no reply within {UAPI_TIMEOUT} s") from None
    except OSError as e:
        raise EngineError(f"UAPI {operation} on {socket_path}: {e.strerror or e}") from None


async def uapi_get(socket_path: Path) -> DeviceStats:
    """``get=1`` over ``socket_path``. Raises UapiError for an error reply, EngineError for I/O.

    Cancellation closes the connection; nothing is left half-done (a get changes nothing).
    """
    result = await _transact(socket_path, encode_get(), "get")
    assert isinstance(result, DeviceStats)
    return result


async def uapi_set(socket_path: Path, request: SetRequest) -> None:
    """``set=1`` over ``socket_path``. Raises UapiError for an error reply, EngineError for I/O.

    Cancelled mid-way, the engine may have applied part of the request: send it again.
    """
    await _transact(socket_path, encode_set(request), "set")
