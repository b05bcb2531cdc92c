"""client._control: the JSON-lines control codec (exact bytes) and the UNIX-socket drivers."""

from __future__ import annotations

import socket
import stat
from collections.abc import Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest

from client._control import (
    MAX_LINE_BYTES,
    ControlError,
    ControlProtocolError,
    ErrorReply,
    Event,
    LineBuffer,
    Request,
    RequestError,
    Result,
    control_call,
    encode_message,
    parse_reply,
    parse_request,
    serve_control,
)


def test_encode_exact_bytes() -> None:
    assert encode_message(Request(1, "ping", {"peer": "beta", "count": 3})) == (
        b'{"id":1,"method":"ping","params":{"peer":"beta","count":3}}\n'
    )
    assert encode_message(Event(1, {"rtt_ms": 1.5})) == b'{"id":1,"event":{"rtt_ms":1.5}}\n'
    assert encode_message(Result(7, {})) == b'{"id":7,"result":{}}\n'
    assert encode_message(ErrorReply(2, "no peer named 'x'")) == b'{"id":2,"error":"no peer named \'x\'"}\n'


def test_parse_round_trips() -> None:
    for message in (Event(3, {"a": [1, 2]}), Result(4, {"peers": []}), ErrorReply(5, "boom")):
        assert parse_reply(encode_message(message).rstrip(b"\n")) == message
    assert parse_request(b'{"id":9,"method":"status"}') == Request(9, "status", {})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"method":"status"}', "'id' must be a non-negative integer"),
        (b'{"id":true,"method":"status"}', "'id' must be a non-negative integer"),
        (b'{"id":-1,"method":"status"}', "'id' must be a non-negative integer"),
        (b'{"id":1,"method":5}', "'method' must be a string"),
        (b'{"id":1,"method":"ping","params":[]}', "'params' must be an object"),
        (b'{"id":1,"method":"ping","extra":1}', "unknown fields ['extra']"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_requests(line: bytes, problem: str) -> None:
    with pytest.raises(ControlProtocolError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_request(line)


@pytest.mark.parametrize(
    "line",
    [b'{"id":1}', b'{"id":1,"event":{},"result":{}}', b'{"id":1,"error":3}', b'{"id":1,"result":[]}'],
)
def test_bad_replies(line: bytes) -> None:
    with pytest.raises(ControlProtocolError):
        parse_reply(line)


def test_line_buffer_splits_and_limits() -> None:
    buffer = LineBuffer(max_line_bytes=10)
    assert buffer.receive_data(b"ab") == []
    assert buffer.partial
    assert buffer.receive_data(b"c\nde\n\nf") == [b"abc", b"de", b""]
    assert buffer.receive_data(b"g\n") == [b"fg"]
    assert not buffer.partial
    with pytest.raises(ControlProtocolError, match="longer than 10 bytes"):
        buffer.receive_data(b"x" * 11)
    with pytest.raises(ControlProtocolError, match="longer than 10 bytes"):
        LineBuffer(max_line_bytes=10).receive_data(b"y" * 11 + b"\n")


def test_oversized_message_is_refused() -> None:
    with pytest.raises(ControlProtocolError, match="exceeds"):
        encode_message(Result(1, {"blob": "x" * MAX_LINE_BYTES}))


async def handler(request: Request, emit: Any) -> Mapping[str, Any]:
    if request.method == "ping":
        for seq in range(int(request.params["count"])):
            await emit({"seq": seq})
        return {"pongs": request.params["count"]}
    if request.method == "status":
        raise RequestError("status is broken today")
    return {"stopping": True}


async def collect(path: Path, method: str, params: dict[str, Any] | None = None) -> list[Event | Result]:
    async with aclosing(control_call(path, method, params)) as replies:
        return [reply async for reply in replies]


async def test_request_events_result_over_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "mesh.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, path, handler)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await collect(path, "ping", {"count": 3}) == [
            Event(1, {"seq": 0}),
            Event(1, {"seq": 1}),
            Event(1, {"seq": 2}),
            Result(1, {"pongs": 3}),
        ]
        with pytest.raises(ControlError, match=r"^status is broken today$"):
            await collect(path, "status")
        with pytest.raises(
            ControlError, match=r"^unknown method 'frobnicate' \(known: status, ping, shutdown\)$"
        ):
            await collect(path, "frobnicate")
        assert await collect(path, "shutdown") == [Result(1, {"stopping": True})]
        tg.cancel_scope.cancel()
    assert not path.exists()  # removed when the server is cancelled


async def test_garbage_gets_an_error_line_and_a_close(tmp_path: Path) -> None:
    path = tmp_path / "mesh.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, path, handler)
        async with await anyio.connect_unix(path) as stream:
            await stream.send(b"hello\n")
            data = b""
            with anyio.fail_after(5):
                try:
                    while True:
                        data += await stream.receive()
                except anyio.EndOfStream:
                    pass
        assert data.startswith(b'{"id":0,"error":"bad request: not JSON')
        assert data.count(b"\n") == 1
        tg.cancel_scope.cancel()


async def test_no_daemon(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(
        ControlError, match=r"absent\.sock: no meshnode running \(start it with 'meshnode up'\)"
    ):
        await collect(path, "status")


async def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "mesh.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: a daemon that was killed
    async with anyio.create_task_group() as tg:
        await tg.start(serve_control, path, handler)
        assert await collect(path, "shutdown") == [Result(1, {"stopping": True})]
        with pytest.raises(ControlError, match="another meshnode is running on this control socket"):
            await serve_control(path, handler)
        tg.cancel_scope.cancel()
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await serve_control(path, handler)
