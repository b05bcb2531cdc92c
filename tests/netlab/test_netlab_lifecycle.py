"""Build/teardown speed, leaks, crash recovery (down --all-stale), the CLI and the fixtures' skips."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import natlib
from natlib.testing import NETNS_PREFIX, Lab, Topology, list_labs, missing_tools, start_stun_server

# Subprocesses must import the natlib under test, whatever the current directory or installation.
ENV = {**os.environ, "PYTHONPATH": str(Path(natlib.__file__).resolve().parents[1])}


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _root_nft() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.netlab
def test_two_site_build_and_teardown_is_fast() -> None:
    topo = Topology.parse("easy,hard")
    t0 = time.monotonic()
    lab = Lab(topo).up()
    t1 = time.monotonic()
    lab.down()
    t2 = time.monotonic()
    assert t2 - t0 < 3.0, f"up {t1 - t0:.2f}s, down {t2 - t1:.2f}s"


@pytest.mark.netlab
def test_twenty_cycles_leave_nothing_behind() -> None:
    ns0, links0, nft0 = _netns(), _root_links(), _root_nft()
    pids: list[int] = []
    prefixes: list[str] = []
    for _ in range(20):
        with Lab(Topology.parse("a=easyEIF,b=hard:hosts=2")) as lab:
            prefixes.append(lab.prefix)
            stun = start_stun_server(lab)
            bg = lab.spawn("a1", ["sleep", "600"], name="sleeper")
            pids += [stun.process.pid, bg.pid]
            workdir = lab.workdir
        assert not workdir.exists()
    assert not any(ns.startswith(p) for ns in _netns() for p in prefixes)
    assert _netns() == ns0
    assert _root_links() == links0
    assert _root_nft() == nft0
    assert [p for p in pids if _pid_alive(p)] == []
    assert not any(st["prefix"] in prefixes for st in list_labs())


CRASHER = textwrap.dedent("""
    import os, sys
    from natlib.testing import Lab, Topology
    lab = Lab(Topology.parse("easy,hard")).up()
    bg = lab.spawn("a1", ["sleep", "600"], name="sleeper")
    print(lab.id, bg.pid, flush=True)
    os.kill(os.getpid(), 9)   # crash: no teardown
""")


@pytest.mark.netlab
def test_down_all_stale_cleans_up_after_a_crash() -> None:
    p = subprocess.run(
        [sys.executable, "-c", CRASHER], capture_output=True, text=True, timeout=30, check=False, env=ENV
    )
    assert p.returncode == -signal.SIGKILL
    lab_id, pid = p.stdout.split()
    prefix = f"{NETNS_PREFIX}{lab_id}-"
    assert any(ns.startswith(prefix) for ns in _netns())
    assert _pid_alive(int(pid))
    out = subprocess.run(
        [sys.executable, "-m", "natlib.testing", "down", "--all-stale"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=ENV,
    ).stdout
    assert lab_id in out
    assert not any(ns.startswith(prefix) for ns in _netns())
    assert not _pid_alive(int(pid))
    assert all(st["id"] != lab_id for st in list_labs())


@pytest.mark.netlab
def test_cli_up_list_down() -> None:
    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "natlib.testing", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=ENV,
        ).stdout

    lab_id = "t" + os.urandom(3).hex()
    out = cli("up", "a=easy:hosts=2,b=v6only", "--id", lab_id)
    assert f"{NETNS_PREFIX}{lab_id}-a1" in out and "192.168.1.2" in out and "2001:db8:1:2::2" in out
    assert "203.0.113.2" in out and "198.51.100.10:3478" in out
    try:
        # Survives the CLI process: the STUN server is up, --all-stale leaves a detached lab alone.
        assert lab_id in cli("list")
        cli("down", "--all-stale")
        assert f"{NETNS_PREFIX}{lab_id}-a1" in _netns()
        st = next(s for s in list_labs() if s["id"] == lab_id)
        assert st["detached"] and st["pids"]
    finally:
        assert f"lab {lab_id} down" in cli("down", lab_id)
    assert not any(ns.startswith(f"{NETNS_PREFIX}{lab_id}-") for ns in _netns())
    assert all(not _pid_alive(p) for p in st["pids"])
    assert "easyAF" in cli("kinds")


SKIPPY = textwrap.dedent("""
    def test_uses_lab(netlab):
        pass
""")


@pytest.mark.parametrize("fail_on_skip", [False, True])
def test_fixtures_skip_with_reason_or_fail_under_fail_on_skip(tmp_path: Path, fail_on_skip: bool) -> None:
    """Without the tools (PATH emptied) the lab fixtures skip with a reason; --fail-on-skip fails."""
    (tmp_path / "test_x.py").write_text(SKIPPY)
    empty = tmp_path / "bin"
    empty.mkdir()
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "natlib.testing.pytest_plugin",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rsfE",
        str(tmp_path / "test_x.py"),
    ]
    if fail_on_skip:
        argv.append("--fail-on-skip")
    env = {**ENV, "PATH": str(empty)}
    p = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=False)
    out = p.stdout
    assert "netlab:" in out and "missing" in out, out
    if fail_on_skip:
        assert p.returncode == 1 and "skipped under --fail-on-skip" in out, out
        assert "1 skipped" not in out
    else:
        assert p.returncode == 0 and "1 skipped" in out, out


def test_missing_tools_reports_root_or_nothing() -> None:
    missing = missing_tools()
    assert ("root" in missing) == (os.geteuid() != 0)
    assert json.dumps(missing)
