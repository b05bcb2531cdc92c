"""A deliberately small HTTP/1.1 client for UPnP (h11 over anyio TCP): one request per connection,
bounded in time and size. Only the gateway is ever contacted (the codec rewrites URLs to it)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc
import h11

from ._errors import PortMapParseError, PortMapTimeoutError

__all__ = ["HttpResponse", "http_request"]

MAX_HEAD_BYTES: Final = 8 * 1024
_READ_CHUNK: Final = 4096


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes


async def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    time_limit: float,
    max_body: int,
) -> HttpResponse:
    """Send one request to ``url`` (``http://`` only) and return status and body.

    Raises :class:`PortMapTimeoutError` when the whole exchange takes longer than ``time_limit``
    seconds, :class:`PortMapParseError` for a malformed response or a body over ``max_body``
    bytes, :class:`OSError` when the connection fails. Cancellation closes the connection.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported, not {url[:100]!r}")
    port = parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host_header = parts.netloc
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    request_headers = [("Host", host_header), ("Connection", "close"), ("User-Agent", "natlib-portmap")]
    request_headers += list(headers)
    if body or method == "POST":
        request_headers.append(("Content-Length", str(len(body))))
    out = conn.send(h11.Request(method=method, target=target, headers=request_headers))
    out += conn.send(h11.Data(data=body)) if body else b""
    out += conn.send(h11.EndOfMessage())
    try:
        with anyio.fail_after(time_limit):
            async with await anyio.connect_tcp(parts.hostname, port) as stream:
                await stream.send(out)
                return await _read_response(stream, conn, max_body)
    except TimeoutError:
        raise PortMapTimeoutError(f"HTTP {method} {url[:100]} took longer than {time_limit}s") from None


async def _read_response(stream: anyio.abc.ByteStream, conn: h11.Connection, max_body: int) -> HttpResponse:
    status: int | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise PortMapParseError(f"malformed HTTP response: {e}") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_body:
                raise PortMapParseError(f"HTTP response body exceeds {max_body} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if status is None:
                raise PortMapParseError("HTTP connection closed before a response")
            return HttpResponse(status, b"".join(chunks))
        # InformationalResponse (100 Continue) and PAUSED cannot carry a body here: keep reading.
        elif event is h11.PAUSED:
            raise PortMapParseError("HTTP connection paused unexpectedly")
