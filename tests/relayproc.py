"""``python -m relay`` as a real process in tests: start it, wait for log lines, stop it.

A reader thread collects the relay's log lines, so tests wait for a line with a deadline instead of
sleeping. ``stop()`` sends SIGTERM (or another signal), waits, and returns the exit status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class RelayProcess:
    def __init__(self, args: Sequence[str]) -> None:
        # One process unless a test asks for workers: tests read single-process logs and numbers.
        if not any(a.lstrip("-").startswith("workers") for a in args):
            args = [*args, "-workers=1"]
        self.argv = [sys.executable, "-m", "relay", *args]
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.returncode: int | None = None

    def start(self) -> None:
        self.lines = []
        self.returncode = None
        proc = subprocess.Popen(
            self.argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.proc = proc

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.lines.append(line)

        threading.Thread(target=pump, daemon=True).start()

    async def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> str:
        """Wait until ``count`` log lines contain ``text``; return the last of them."""
        with trio.fail_after(timeout):
            while True:
                hits = [line for line in list(self.lines) if text in line]
                if len(hits) >= count:
                    return hits[count - 1]
                assert self.proc is not None
                assert self.proc.poll() is None, "relay exited early:\n" + "".join(self.lines)
                await trio.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.returncode = rc
        return rc


@asynccontextmanager
async def relay_process(*args: str) -> AsyncIterator[RelayProcess]:
    """A started relay process, stopped with SIGTERM on exit (see ``.returncode``)."""
    relay = RelayProcess(args)
    relay.start()
    try:
        yield relay
    finally:
        await trio.to_thread.run_sync(relay.stop)
