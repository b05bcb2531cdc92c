"""Helpers for the interop tests: find the Go binaries, run them as processes, read their output.

The binaries are Tailscale's ``derper`` and our ``derpcheck`` probe (``derpcheck/main.go``), both
built by ``.ci/interop-deps.sh`` from the tailscale.com version pinned in ``go.mod`` into
``$MESHRELAY_INTEROP_BIN`` (default ``/var/cache/meshrelay-interop/bin``). Tests skip, saying how to
build them, when they are missing or older than their sources.

Everything here reads process output line by line with deadlines; nothing sleeps to synchronise.
Every process is killed by PID when its context manager exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from natlib.derp import PeerGone, PeerGoneReason, RecvPacket
from natlib.derphttp import DerpClient, DerpEvent
from natlib.keys import NodePrivateKey, NodePublicKey

HERE = Path(__file__).resolve().parent
DEFAULT_BIN_DIR = "/var/cache/meshrelay-interop/bin"
LINE_TIMEOUT = 15.0


def bin_dir() -> Path:
    return Path(os.environ.get("MESHRELAY_INTEROP_BIN") or DEFAULT_BIN_DIR)


def binaries_problem() -> str | None:
    """Why the interop binaries cannot be used (missing, or older than their sources), or None."""
    how = "build them with: bash .ci/interop-deps.sh (needs Go and the Go module proxy)"
    sources = [HERE / "go.mod", HERE / "go.sum", *sorted((HERE / "derpcheck").glob("*.go"))]
    for name in ("derper", "derpcheck"):
        path = bin_dir() / name
        if not os.access(path, os.X_OK):
            return f"interop binary {path} is missing; {how}"
        stale = [s.name for s in sources if s.stat().st_mtime > path.stat().st_mtime]
        if stale:
            return f"interop binary {path} is older than {', '.join(stale)}; {how}"
    return None


requires_binaries = pytest.mark.skipif(binaries_problem() is not None, reason=binaries_problem() or "")
"""Module mark for every interop test: skip with the reason when the Go binaries are unusable."""


def go_binary(name: str) -> Path:
    """Path of a built interop binary (tests carry :data:`requires_binaries`)."""
    return bin_dir() / name


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GoProcess:
    """A child process whose stdout is read as lines (JSON lines for derpcheck).

    A background task drains stdout into memory as it arrives, so a chatty child never blocks on
    a full pipe while the test is busy elsewhere; :meth:`line` and :meth:`event` consume from it.
    """

    def __init__(self, name: str, process: trio.Process, stderr_path: Path) -> None:
        self.name = name
        self.process = process
        self.stderr_path = stderr_path
        self.events: list[dict[str, object]] = []
        self._lines: list[str] = []
        self._next = 0
        self._eof = False
        self._changed = trio.Event()

    async def _pump(self) -> None:
        assert self.process.stdout is not None
        buf = bytearray()
        try:
            while chunk := await self.process.stdout.receive_some(65536):
                buf += chunk
                *complete, rest = bytes(buf).split(b"\n")
                buf = bytearray(rest)
                if complete:
                    self._lines += [c.decode(errors="replace") for c in complete]
                    self._changed.set()
                    self._changed = trio.Event()
            if buf:
                self._lines.append(buf.decode(errors="replace"))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._eof = True
            self._changed.set()

    def stderr_tail(self, n: int = 25) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _explain(self, what: str) -> str:
        return (
            f"{self.name}: {what}\n--- stdout events so far: {self.events!r}\n"
            f"--- stderr (tail):\n{self.stderr_tail()}"
        )

    async def line(self, timeout: float = LINE_TIMEOUT) -> str | None:
        """The next stdout line, or None at EOF. Fails the test after ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while self._next >= len(self._lines):
                if self._eof:
                    return None
                await self._changed.wait()
            self._next += 1
            return self._lines[self._next - 1]
        raise AssertionError(self._explain(f"no output line within {timeout:g} s"))

    async def event(self, name: str, timeout: float = LINE_TIMEOUT, **match: object) -> dict[str, object]:
        """Read JSON lines until one has ``event == name`` (and the given fields); fail on "error"."""
        with trio.move_on_after(timeout):
            while True:
                text = await self.line(timeout)
                if text is None:
                    raise AssertionError(self._explain(f"exited before event {name!r} {match or ''}"))
                ev = json.loads(text)
                self.events.append(ev)
                if ev["event"] == "error":
                    raise AssertionError(self._explain(f"reported an error: {ev['error']}"))
                if ev["event"] == name and all(ev.get(k) == v for k, v in match.items()):
                    return ev
        raise AssertionError(self._explain(f"no event {name!r} {match or ''} within {timeout:g} s"))

    async def close_stdin(self) -> None:
        if self.process.stdin is not None:
            await self.process.stdin.aclose()

    async def wait(self, timeout: float = LINE_TIMEOUT) -> int:
        with trio.move_on_after(timeout):
            return await self.process.wait()
        raise AssertionError(self._explain(f"did not exit within {timeout:g} s"))

    async def finish(self, timeout: float = LINE_TIMEOUT) -> list[dict[str, object]]:
        """Read the rest of stdout and wait for the exit; fail unless it exits 0 without errors."""
        while (text := await self.line(timeout)) is not None:
            self.events.append(json.loads(text))
        rc = await self.wait(timeout)
        errors = [e for e in self.events if e["event"] == "error"]
        assert rc == 0 and not errors, self._explain(f"exited with {rc}")
        return self.events


@asynccontextmanager
async def spawn(
    name: str, argv: Sequence[str | os.PathLike[str]], tmp_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[GoProcess]:
    """Run ``argv`` with stdin/stdout pipes, stderr to a file; kill it (by PID) on exit."""
    stderr_path = tmp_path / f"{name}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [os.fspath(a) for a in argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    proc = GoProcess(name, process, stderr_path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proc._pump)
            try:
                yield proc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()


def derpcheck_client(
    url: str, *args: str | os.PathLike[str], key: NodePrivateKey | None = None
) -> list[str | os.PathLike[str]]:
    argv: list[str | os.PathLike[str]] = [go_binary("derpcheck"), "client", "-url", url]
    if key is not None:
        argv += ["-key", key.text()]
    return [*argv, *args]


async def wait_for_file_line(path: Path, needle: str, proc: GoProcess, timeout: float = 20.0) -> str:
    """Poll a log file (written by a child) until a line contains ``needle``; fail on exit/timeout."""
    with trio.move_on_after(timeout):
        while True:
            text = await trio.Path(path).read_text(errors="replace")
            for line in text.splitlines():
                if needle in line:
                    return line
            if proc.process.poll() is not None:
                raise AssertionError(proc._explain(f"exited ({proc.process.returncode}) before {needle!r}"))
            await trio.sleep(0.02)  # polling a file with a deadline, not synchronising by sleep
    raise AssertionError(proc._explain(f"no log line with {needle!r} within {timeout:g} s"))


async def wait_tcp(port: int, proc: GoProcess, timeout: float = 20.0) -> None:
    """Poll until 127.0.0.1:port accepts TCP connections."""
    with trio.move_on_after(timeout):
        while True:
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                if proc.process.poll() is not None:
                    raise AssertionError(proc._explain(f"exited ({proc.process.returncode})")) from None
                await trio.sleep(0.02)
                continue
            await s.aclose()
            return
    raise AssertionError(proc._explain(f"127.0.0.1:{port} not accepting within {timeout:g} s"))


@dataclass
class Derper:
    """A running Tailscale derper on 127.0.0.1."""

    proc: GoProcess
    port: int
    server_key: NodePublicKey
    tls: bool
    certdir: Path
    stun_port: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/derp"

    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/derp"

    def cert_pin(self) -> str:
        """DERPNode.CertName for derper's self-signed IP certificate: ``sha256-raw:<hex>``."""
        pem = (self.certdir / "127.0.0.1.crt").read_text()
        return "sha256-raw:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()

    def ssl_context(self) -> ssl.SSLContext | None:
        """Trusts derper's self-signed IP certificate (the pin in its DERPNode log line)."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.certdir / "127.0.0.1.crt"))


@asynccontextmanager
async def run_derper(
    tmp_path: Path, *, tls: bool, mesh_key: bytes | None = None, stun: bool = False
) -> AsyncIterator[Derper]:
    """Start ``derper`` on a free 127.0.0.1 port with a key we chose (derper's key file format).

    TLS uses ``-certmode manual -hostname 127.0.0.1``: derper creates a self-signed IP certificate,
    appends its meta-certificate, and logs the DERPNode JSON with the ``sha256-raw:`` pin. Plain
    HTTP is a non-443 ``-a`` without manual cert mode.
    """
    derper = go_binary("derper")
    work = Path(tempfile.mkdtemp(prefix="derper-", dir=tmp_path))
    key = NodePrivateKey.generate()
    (work / "derper.key").write_text(json.dumps({"PrivateKey": key.text()}))
    port = free_tcp_port()
    argv: list[str | os.PathLike[str]] = [derper, "-a", f"127.0.0.1:{port}", "-c", work / "derper.key"]
    argv += ["-http-port", "-1", "-home", "blank"]
    certdir = work / "certs"
    if tls:
        argv += ["-certmode", "manual", "-certdir", certdir, "-hostname", "127.0.0.1"]
    stun_port = free_udp_port() if stun else None
    argv += ["-stun=true", "-stun-port", str(stun_port)] if stun_port else ["-stun=false"]
    if mesh_key is not None:
        (work / "mesh.key").write_text(mesh_key.hex() + "\n")
        argv += ["-mesh-psk-file", work / "mesh.key"]
    else:
        argv += ["-mesh-psk-file", ""]
    async with spawn("derper", argv, work) as proc:
        await wait_for_file_line(proc.stderr_path, "derper: serving on", proc)
        await wait_tcp(port, proc)
        yield Derper(proc, port, key.public, tls, certdir, stun_port)


# -- DERP exchanges shared by the tests ------------------------------------------------------------

RECV_TIMEOUT = 10.0
GO_PACKETS = 10


async def receive_matching(
    client: DerpClient, pred: Callable[[DerpEvent], bool], timeout: float = RECV_TIMEOUT
) -> DerpEvent:
    """The next event that satisfies ``pred``; other events (KeepAlive, ...) are skipped."""
    with trio.fail_after(timeout):
        while True:
            event = await client.receive()
            if pred(event):
                return event


def packet_from(src: NodePublicKey) -> Callable[[DerpEvent], bool]:
    return lambda e: isinstance(e, RecvPacket) and e.src == src.raw


def gone(key: NodePublicKey) -> Callable[[DerpEvent], bool]:
    return lambda e: isinstance(e, PeerGone) and e.key == key.raw


async def exchange(go: GoProcess, connected: dict[str, object], ours: DerpClient, go_key: NodePrivateKey,
                   server_key: NodePublicKey) -> None:  # fmt: skip
    """The common script, after the Go client's "connected" event: the Go client (started with
    ``-send-to ours -count GO_PACKETS -expect-echo -echo -ping 3 -stay``) and our client trade
    packets both ways, ping, then the Go client leaves."""
    assert connected["server"] == server_key.text()
    assert connected["self"] == go_key.public.text()
    # Go -> ours, byte for byte; we echo each one and derpcheck checks what comes back.
    for i in range(GO_PACKETS):
        event = await receive_matching(ours, packet_from(go_key.public))
        assert isinstance(event, RecvPacket)
        assert event.packet.startswith(f"derpcheck packet {i};".encode()), event.packet[:40]
        assert len(event.packet) == 100
        await ours.send(go_key.public, event.packet)
    await go.event("echoed", count=GO_PACKETS)
    assert [e["seq"] for e in go.events if e["event"] == "pong"] == [0, 1, 2]
    # Ours -> Go: derpcheck echoes everything (sizes 0, 1 and the 64 KiB maximum included).
    for payload in (b"", b"x", b"from natlib " + bytes(range(256)), os.urandom(65536)):
        await ours.send(go_key.public, payload)
        event = await receive_matching(ours, packet_from(go_key.public))
        assert isinstance(event, RecvPacket)
        assert event.packet == payload, (len(event.packet), len(payload))
    # Our Ping/Pong still works alongside.
    with trio.fail_after(RECV_TIMEOUT):
        await ours.ping()
    # The Go client leaves: we received from it, so the relay tells us it is gone.
    await go.close_stdin()
    events = await go.finish()
    assert events[-1]["event"] == "closed"
    event = await receive_matching(ours, gone(go_key.public))
    assert event == PeerGone(go_key.public.raw, PeerGoneReason.DISCONNECTED)


GO_EXCHANGE_ARGS = ["-count", str(GO_PACKETS), "-expect-echo", "-echo", "-ping", "3", "-stay"]
