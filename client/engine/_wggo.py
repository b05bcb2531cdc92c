"""The wireguard-go backend: a supervised ``wireguard-go -f <ifname>`` driven over its UAPI socket."""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import anyio
import anyio.abc

from ..uapi import DeviceStats, SetRequest, UapiError
from ._base import EngineError, InterfaceConfig, check_ifname, configure_interface, link_exists, run_command
from ._uapi_socket import uapi_get, uapi_set

__all__ = [
    "DEFAULT_SOCKET_DIR",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "WireGuardGo",
    "open_wireguard_go",
]

logger = logging.getLogger(__name__)

#: Where wireguard-go creates ``<ifname>.sock``. The directory is not network-namespaced, so two
#: engines in two namespaces of one machine still need different interface names.
DEFAULT_SOCKET_DIR: Final = Path("/var/run/wireguard")
#: wireguard-go creates its socket within a fraction of a second; past this it is not coming.
START_TIMEOUT: Final = 10.0
#: After SIGTERM wireguard-go closes the TUN device and exits at once; then SIGKILL.
STOP_TIMEOUT: Final = 5.0
_SOCKET_POLL_INTERVAL: Final = 0.01
_OUTPUT_TAIL_LINES: Final = 20
_OUTPUT_DRAIN_TIMEOUT: Final = 1.0


class WireGuardGo:
    """A running wireguard-go process with its interface. Made by :func:`open_wireguard_go`."""

    def __init__(self, ifname: str, socket_path: Path, process: anyio.abc.Process) -> None:
        self._ifname = ifname
        self.socket_path = socket_path
        self._process = process
        self._output_tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
        self._stopping = False
        self._stopped = False
        self._output_done = anyio.Event()

    @property
    def ifname(self) -> str:
        return self._ifname

    @property
    def pid(self) -> int:
        return self._process.pid

    def output_tail(self) -> str:
        """The last lines wireguard-go printed (for error messages)."""
        return " | ".join(self._output_tail)

    async def configure(self, request: SetRequest) -> None:
        """Send a UAPI ``set``; EngineError if wireguard-go refuses it or does not answer."""
        try:
            await uapi_set(self.socket_path, request)
        except UapiError as e:
            raise EngineError(f"{self._ifname}: {e}") from e

    async def stats(self) -> DeviceStats:
        """UAPI ``get``: peers, endpoints, handshake times and counters."""
        try:
            return await uapi_get(self.socket_path)
        except UapiError as e:
            raise EngineError(f"{self._ifname}: {e}") from e

    # --- supervision ------------------------------------------------------------------------------

    async def _pump_output(self) -> None:
        stream = self._process.stdout
        assert stream is not None
        pending = b""
        try:
            async for chunk in stream:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._output_line(raw)
            if pending:
                self._output_line(pending)
        finally:
            self._output_done.set()

    def _output_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        if line.strip(" │┌┐└┘─"):  # skip the frame of wireguard-go's "kernel has WireGuard" banner
            self._output_tail.append(line)
            level = logging.WARNING if line.startswith("ERROR") else logging.INFO
            logger.log(level, "wireguard-go[%s]: %s", self._ifname, line)

    async def _watch(self) -> None:
        status = await self._process.wait()
        if not self._stopping:
            with anyio.move_on_after(_OUTPUT_DRAIN_TIMEOUT):
                await self._output_done.wait()
            raise EngineError(
                f"wireguard-go for {self._ifname} exited unexpectedly (status {status}): {self.output_tail()}"
            )

    async def _wait_for_socket(self) -> None:
        with anyio.move_on_after(START_TIMEOUT):
            while not self.socket_path.exists():
                if self._process.returncode is not None:
                    with anyio.move_on_after(_OUTPUT_DRAIN_TIMEOUT):
                        await self._output_done.wait()  # its last words explain why
                    raise EngineError(
                        f"wireguard-go for {self._ifname} exited (status {self._process.returncode}) "
                        f"before creating {self.socket_path}: {self.output_tail()}"
                    )
                await anyio.sleep(_SOCKET_POLL_INTERVAL)  # the socket's creation has no event to wait on
            return
        raise EngineError(f"wireguard-go for {self._ifname}: no {self.socket_path} within {START_TIMEOUT} s")

    async def _stop(self) -> None:
        """SIGTERM (wireguard-go then deletes its interface and socket), SIGKILL if it lingers, then
        remove whatever is left of the interface and the socket."""
        if self._stopped:
            return
        self._stopping = True
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(STOP_TIMEOUT):
                await self._process.wait()
            if self._process.returncode is None:
                logger.warning("wireguard-go for %s ignored SIGTERM; killing it", self._ifname)
                self._process.kill()
                await self._process.wait()
        if await link_exists(self._ifname):
            await run_command(["ip", "link", "del", "dev", self._ifname])
        if self.socket_path.exists():
            self.socket_path.unlink(missing_ok=True)
        self._stopped = True


@asynccontextmanager
async def open_wireguard_go(
    ifname: str,
    interface: InterfaceConfig | None = None,
    *,
    binary: str = "wireguard-go",
    socket_dir: Path = DEFAULT_SOCKET_DIR,
    log_level: str = "error",
) -> AsyncIterator[WireGuardGo]:
    """Start ``wireguard-go -f ifname``, wait for its UAPI socket, set up the interface with ``ip``
    (``interface``: addresses, MTU, up, routes), and yield the running engine.

    The process is supervised: if it exits while the context is open, the body is cancelled and
    EngineError is raised. Leaving the context (normally, by an exception or by cancellation) stops
    wireguard-go with SIGTERM (SIGKILL after :data:`STOP_TIMEOUT`) and makes sure the interface and
    the socket are gone; that cleanup is shielded from cancellation.

    Needs CAP_NET_ADMIN and ``/dev/net/tun``. ``log_level`` is wireguard-go's ``LOG_LEVEL``
    (``error``, ``verbose`` or ``debug``); its output goes to this module's logger.
    """
    check_ifname(ifname)
    socket_path = socket_dir / f"{ifname}.sock"
    if await link_exists(ifname):
        raise EngineError(f"interface {ifname} already exists; pick another name or delete it")
    if socket_path.exists():
        # A socket with no interface is left over by a killed engine; wireguard-go would replace it.
        logger.warning("removing stale UAPI socket %s", socket_path)
        socket_path.unlink(missing_ok=True)
    env = {**os.environ, "LOG_LEVEL": log_level}
    try:
        process = await anyio.open_process(
            [binary, "-f", ifname],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
    except OSError as e:
        raise EngineError(f"cannot start {binary}: {e.strerror or e}") from None
    engine = WireGuardGo(ifname, socket_path, process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine._pump_output)
            await engine._wait_for_socket()
            if interface is not None:
                await configure_interface(ifname, interface)
            tg.start_soon(engine._watch)
            logger.info("wireguard-go for %s running (pid %d)", ifname, process.pid)
            try:
                yield engine
            finally:
                with anyio.CancelScope(shield=True):
                    await engine._stop()  # the output pump and the watcher then end by themselves
    except BaseExceptionGroup as group:
        # The task group wraps whatever ended it; callers should see the error itself (the engine's,
        # or their own exception from the body) when there is just one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await engine._stop()
            await process.aclose()
        logger.info("wireguard-go for %s stopped", ifname)
