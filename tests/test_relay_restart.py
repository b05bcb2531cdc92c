"""Graceful restart: SIGTERM → Restarting to every client, drain, exit 0; natlib's
PersistentClient honours the hint and reconnects to the relay's successor on the same port.

The test streams packets through the restart and reports how many were lost (recorded as a test
property and printed), which is the number the operators' docs quote.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio
from relayproc import RelayProcess, free_ports

from natlib.derp import RecvPacket
from natlib.derphttp import PersistentClient
from natlib.keys import NodePrivateKey


async def _until(pred: object, timeout: float) -> None:
    assert callable(pred)
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


async def test_graceful_restart_under_traffic(tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    port = free_ports()[0]
    args = [
        "-a",
        f"127.0.0.1:{port}",
        "-c",
        str(tmp_path / "derper.key"),
        "-stun=false",
        "-metrics-addr=off",
        "-restart-reconnect-in",
        "200ms",
        "-restart-try-for",
        "10s",
        "-shutdown-grace",
        "3s",
    ]
    old = RelayProcess(args)
    new = RelayProcess(args)
    old.start()
    try:
        await old.wait_for("serving DERP on")
        url = f"http://127.0.0.1:{port}/derp"
        a_key, b_key = NodePrivateKey.generate(), NodePrivateKey.generate()
        async with PersistentClient(url, a_key) as a, PersistentClient(url, b_key) as b:
            with trio.fail_after(10):
                await a.wait_connected()
                await b.wait_connected()
            received: set[int] = set()
            sent = 0
            stop = trio.Event()

            async def sender() -> None:
                nonlocal sent
                while not stop.is_set():
                    await a.send(b.local_key, sent.to_bytes(4, "big"))
                    sent += 1
                    await trio.sleep(0.002)  # pacing the load, not synchronisation

            async def receiver() -> None:
                while True:
                    ev = await b.receive()
                    if isinstance(ev, RecvPacket) and ev.src == a_key.public.raw:
                        received.add(int.from_bytes(ev.packet[:4], "big"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(receiver)
                await _until(lambda: len(received) >= 100, 10)
                # The old relay is told to stop; its successor starts on the same port and key.
                assert await trio.to_thread.run_sync(old.stop, signal.SIGTERM) == 0
                new.start()
                await new.wait_for("serving DERP on")
                await _until(lambda: a.restarts_honoured == 1 and b.restarts_honoured == 1, 10)
                await _until(lambda: a.connects == 2 and b.connects == 2, 10)
                restart_mark = sent
                await _until(lambda: any(seq > restart_mark for seq in received), 10)
                stop.set()
                final = sent
                await _until(lambda: all(seq in received for seq in range(restart_mark + 1, final - 5)), 10)
                nursery.cancel_scope.cancel()
        assert any("told 2 connections to reconnect" in line for line in old.lines), "".join(old.lines)
        lost = final - len(received)
        record_property("packets_sent", final)
        record_property("packets_lost_during_restart", lost)
        sys.stdout.write(
            f"\ngraceful restart: {final} packets sent at ~500/s, {lost} lost "
            f"({a.dropped_while_disconnected} of them not sent while reconnecting)\n"
        )
        assert 0 <= lost < final
    finally:
        if old.proc is not None and old.returncode is None:
            old.stop()
        if new.proc is not None:
            assert new.stop() == 0
