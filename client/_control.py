"""The local control socket between ``meshnode`` commands and a running ``meshnode up``.

A UNIX stream socket (default ``/run/meshnode/<mesh>.sock``, mode 0600: only root, or the owner,
may talk to the daemon) carrying JSON lines. The client writes one request per line::

    {"id": 1, "method": "status", "params": {}}

and the daemon answers with any number of events for that request (``ping`` streams one per pong),
then exactly one final line, a result or an error::

    {"id": 1, "event": {...}}
    {"id": 1, "result": {...}}
    {"id": 1, "error": "no peer named 'delta'"}

Methods: ``status`` (the path table), ``ping`` (params ``peer``, ``count``, ``until_direct``,
``timeout``; one event per pong or timeout), ``shutdown``.

The codec (:class:`LineBuffer`, :func:`encode_message`, :func:`parse_request`,
:func:`parse_reply`) is sans-io. The drivers are :func:`serve_control` (daemon side) and
:func:`control_call` (command side), on anyio.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

import anyio
import anyio.abc

__all__ = [
    "DEFAULT_CONTROL_DIR",
    "MAX_LINE_BYTES",
    "METHODS",
    "ControlError",
    "ControlProtocolError",
    "ErrorReply",
    "Event",
    "LineBuffer",
    "Request",
    "RequestError",
    "Result",
    "control_call",
    "default_control_path",
    "encode_message",
    "parse_reply",
    "parse_request",
    "serve_control",
]

logger = logging.getLogger(__name__)

DEFAULT_CONTROL_DIR: Final = Path("/run/meshnode")
#: A status line is about 300 bytes per peer: 1 MiB is thousands of peers.
MAX_LINE_BYTES: Final = 1 << 20
#: How many requests one connection may send; the CLI sends one.
MAX_REQUESTS_PER_CONNECTION: Final = 64
#: How long the CLI waits for the daemon's next line.
REPLY_TIMEOUT: Final = 30.0
METHODS: Final = ("status", "ping", "shutdown")
SOCKET_MODE: Final = 0o600


class ControlProtocolError(Exception):
    """A line is not a valid control message (bad JSON, wrong fields, too long)."""


class ControlError(Exception):
    """The daemon is not reachable, or it answered the request with an error."""


class RequestError(Exception):
    """Raised by a request handler: sent to the client as the request's error line."""


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    id: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: int
    message: str


Message: TypeAlias = Request | Event | Result | ErrorReply
Reply: TypeAlias = Event | Result | ErrorReply


def encode_message(message: Message) -> bytes:
    """One JSON line (compact, UTF-8, ``\\n``-terminated)."""
    body: dict[str, Any]
    if isinstance(message, Request):
        body = {"id": message.id, "method": message.method, "params": dict(message.params)}
    elif isinstance(message, Event):
        body = {"id": message.id, "event": dict(message.data)}
    elif isinstance(message, Result):
        body = {"id": message.id, "result": dict(message.data)}
    else:
        body = {"id": message.id, "error": message.message}
    line = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise ControlProtocolError(f"message of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
    return line


def _object(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise ControlProtocolError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ControlProtocolError("not a JSON object")
    ident = value.get("id")
    if not isinstance(ident, int) or isinstance(ident, bool) or not 0 <= ident < 1 << 53:
        raise ControlProtocolError("'id' must be a non-negative integer")
    return value


def parse_request(line: bytes) -> Request:
    """A request line → :class:`Request`; ControlProtocolError if malformed (unknown methods pass:
    the daemon answers them with an error)."""
    value = _object(line)
    method, params = value.get("method"), value.get("params", {})
    if not isinstance(method, str):
        raise ControlProtocolError("'method' must be a string")
    if not isinstance(params, dict):
        raise ControlProtocolError("'params' must be an object")
    if set(value) - {"id", "method", "params"}:
        raise ControlProtocolError(f"unknown fields {sorted(set(value) - {'id', 'method', 'params'})}")
    return Request(value["id"], method, params)


def parse_reply(line: bytes) -> Reply:
    """A daemon line → :class:`Event`, :class:`Result` or :class:`ErrorReply`."""
    value = _object(line)
    kinds = [k for k in ("event", "result", "error") if k in value]
    if len(kinds) != 1 or len(value) != 2:
        raise ControlProtocolError("a reply has 'id' and exactly one of 'event', 'result', 'error'")
    kind, body = kinds[0], value[kinds[0]]
    if kind == "error":
        if not isinstance(body, str):
            raise ControlProtocolError("'error' must be a string")
        return ErrorReply(value["id"], body)
    if not isinstance(body, dict):
        raise ControlProtocolError(f"{kind!r} must be an object")
    return Event(value["id"], body) if kind == "event" else Result(value["id"], body)


class LineBuffer:
    """Bytes in, complete lines out (without the newline); a line longer than ``max_line_bytes``
    raises ControlProtocolError."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._pending = bytearray()
        self._max = max_line_bytes

    def receive_data(self, data: bytes) -> list[bytes]:
        self._pending += data
        *lines, rest = self._pending.split(b"\n")
        if len(rest) > self._max or any(len(line) > self._max for line in lines):
            raise ControlProtocolError(f"line longer than {self._max} bytes")
        self._pending = bytearray(rest)
        return [bytes(line) for line in lines]

    @property
    def partial(self) -> bool:
        """True if bytes of an unfinished line are buffered (at end of stream: a truncated line)."""
        return bool(self._pending)


# --- daemon side ----------------------------------------------------------------------------------

Emit: TypeAlias = Callable[[Mapping[str, Any]], Awaitable[None]]
Handler: TypeAlias = Callable[[Request, Emit], Awaitable[Mapping[str, Any]]]


def default_control_path(mesh_name: str) -> Path:
    return DEFAULT_CONTROL_DIR / f"{mesh_name}.sock"


def _socket_is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _prepare_socket_path(path: Path) -> None:
    if path.parent == DEFAULT_CONTROL_DIR:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path}: exists and is not a socket; refusing to replace it")
    if _socket_is_live(path):
        raise ControlError(f"{path}: another meshnode is running on this control socket")
    path.unlink()  # left over by a daemon that was killed


async def _serve_connection(stream: anyio.abc.SocketStream, handler: Handler) -> None:
    buffer = LineBuffer()
    handled = 0
    async with stream:
        while handled < MAX_REQUESTS_PER_CONNECTION:
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            try:
                lines = buffer.receive_data(data)
            except ControlProtocolError as e:
                await stream.send(encode_message(ErrorReply(0, str(e))))
                return
            for line in lines:
                handled += 1
                try:
                    request = parse_request(line)
                except ControlProtocolError as e:
                    await stream.send(encode_message(ErrorReply(0, f"bad request: {e}")))
                    return
                await _handle(stream, handler, request)


async def _handle(stream: anyio.abc.SocketStream, handler: Handler, request: Request) -> None:
    async def emit(data: Mapping[str, Any]) -> None:
        await stream.send(encode_message(Event(request.id, data)))

    reply: Reply
    if request.method not in METHODS:
        reply = ErrorReply(request.id, f"unknown method {request.method!r} (known: {', '.join(METHODS)})")
    else:
        try:
            reply = Result(request.id, await handler(request, emit))
        except RequestError as e:
            reply = ErrorReply(request.id, str(e))
    await stream.send(encode_message(reply))


async def serve_control(
    path: Path, handler: Handler, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``path`` (mode 0600) and answer requests with ``handler`` until cancelled.

    A stale socket file (nothing listening) is replaced; a live one raises ControlError. Each
    connection is served in its own task; a client that disconnects mid-request cancels nothing
    but its own reply. Cancellation closes the listener and every connection and removes ``path``.
    """
    _prepare_socket_path(path)
    try:
        listener = await anyio.create_unix_listener(path)
    except OSError as e:
        raise ControlError(f"{path}: cannot listen: {e.strerror or e}") from None
    try:
        os.chmod(path, SOCKET_MODE)
        async with listener:
            task_status.started()
            await listener.serve(lambda stream: _serve_connection(stream, handler))
    finally:
        _remove_socket(path)


def _remove_socket(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --- command side ---------------------------------------------------------------------------------


async def control_call(
    path: Path,
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    timeout: float = REPLY_TIMEOUT,  # noqa: ASYNC109
) -> AsyncGenerator[Event | Result, None]:
    """Send one request to the daemon at ``path`` and yield its events, then its result.

    ControlError if the daemon is not running, answers with an error, stops mid-reply or is silent
    for ``timeout`` seconds. Breaking out of the iteration closes the connection (the daemon then
    stops that request's work).
    """
    try:
        stream = await anyio.connect_unix(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise ControlError(f"{path}: no meshnode running (start it with 'meshnode up')") from None
        raise ControlError(f"{path}: cannot connect: {e.strerror or e}") from None
    request = Request(1, method, dict(params or {}))
    buffer = LineBuffer()
    async with stream:
        await stream.send(encode_message(request))
        while True:
            try:
                with anyio.fail_after(timeout):
                    data = await stream.receive()
            except TimeoutError:
                raise ControlError(f"{path}: no answer within {timeout} s") from None
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                raise ControlError(f"{path}: the daemon closed the connection mid-reply") from None
            try:
                lines = buffer.receive_data(data)
                replies = [parse_reply(line) for line in lines]
            except ControlProtocolError as e:
                raise ControlError(f"{path}: bad reply: {e}") from None
            for reply in replies:
                if isinstance(reply, ErrorReply):
                    raise ControlError(reply.message)
                if reply.id != request.id:
                    raise ControlError(f"{path}: reply for request {reply.id}, expected {request.id}")
                yield reply
                if isinstance(reply, Result):
                    return
