"""The lab itself: network namespaces, veth pairs, routes and nftables, built from a Topology."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

from . import _nft
from ._spec import SiteSpec, Topology

__all__ = [
    "NETNS_PREFIX",
    "Host",
    "Lab",
    "LabCommandError",
    "LabError",
    "LabProcess",
    "Site",
    "down_all",
    "down_lab",
    "list_labs",
    "missing_tools",
]

logger = logging.getLogger(__name__)

#: Every namespace of every lab is named ``natlab-<lab id>-<host>``.
NETNS_PREFIX: Final = "natlab-"
REQUIRED_TOOLS: Final = ("ip", "nft", "conntrack", "sysctl")
AGENT: Final = Path(__file__).with_name("_agent.py")

Role = Literal["inet", "server", "router", "lan", "public"]

_INET_V4: Final = "192.0.2.1"  # the internet router's own address (on every one of its links)
_INET_V6_LL: Final = "fe80::1"
_PEER_V6_LL: Final = "fe80::2"


def state_root() -> Path:
    """Where labs record what they created (``NATLIB_TESTING_STATE``, default /run/natlib-testing)."""
    return Path(os.environ.get("NATLIB_TESTING_STATE", "/run/natlib-testing"))


class LabError(RuntimeError):
    """Building, using or tearing down the lab failed."""


class LabCommandError(LabError):
    """A command run in a lab host failed; the message includes its output."""

    def __init__(self, host: str, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.host = host
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"[{host}] {' '.join(argv)} exited with {returncode}\nstdout: {stdout.strip()}\n"
            f"stderr: {stderr.strip()}"
        )


def missing_tools() -> list[str]:
    """The lab's requirements that this machine lacks (empty when the lab can run)."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.insert(0, "root")
    return missing


@dataclass
class Host:
    """One network namespace of the lab.

    ``ipv4``/``ipv6`` list the host's own addresses (primary first); ``uplink`` is its interface toward
    its router (``eth0``), or ``wan`` on a NAT router.
    """

    name: str
    netns: str
    role: Role
    site: str | None = None
    ipv4: list[str] = field(default_factory=list)
    ipv6: list[str] = field(default_factory=list)
    uplink: str = "eth0"

    @property
    def address(self) -> str:
        """The primary address (IPv4 if it has one)."""
        return (self.ipv4 or self.ipv6)[0]


@dataclass
class Site:
    """A site as built: its router (None for ``nat="none"``), its hosts and its public address."""

    spec: SiteSpec
    router: Host | None
    hosts: list[Host]
    public_ipv4: str | None
    lan_subnet: str | None
    lan_subnet6: str | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nat(self) -> str:
        return self.spec.nat


class LabProcess:
    """A background process in a lab host, its stdout and stderr captured to ``log_path``."""

    def __init__(
        self, lab: Lab, host: str, name: str, popen: subprocess.Popen[bytes], log_path: Path
    ) -> None:
        self.lab = lab
        self.host = host
        self.name = name
        self.log_path = log_path
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Poll the log until ``pattern`` (a regex) appears; LabError on deadline or early exit."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            m = rx.search(self.output())
            if m:
                return m
            if self._popen.poll() is not None:
                m = rx.search(self.output())
                if m:
                    return m
                raise LabError(
                    f"{self.name} in {self.host} exited ({self._popen.returncode}) before printing "
                    f"{pattern!r}; log:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"{self.name} in {self.host}: no {pattern!r} within {timeout}s; log:\n"
                    f"{self.output()[-3000:]}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def json_lines(self) -> list[dict[str, Any]]:
        """The process's stdout lines that are JSON objects (the agent's output format)."""
        out: list[dict[str, Any]] = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def write_line(self, line: str) -> None:
        """Write a line to the process's stdin (spawned with ``stdin=True``)."""
        if self._popen.stdin is None:
            raise LabError(f"{self.name} was not spawned with stdin=True")
        self._popen.stdin.write(line.encode() + b"\n")
        self._popen.stdin.flush()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; LabError after ``timeout``."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"{self.name} in {self.host} still running after {timeout}s") from None

    def stop(self, timeout: float = 2.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self._popen.kill()
                self._popen.wait()
        if self._popen.stdin is not None:
            with contextlib.suppress(OSError):
                self._popen.stdin.close()
        return self._popen.returncode

    def __repr__(self) -> str:
        return f"<LabProcess {self.name} pid={self.pid} host={self.host} rc={self.returncode}>"


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0) -> str:
    p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise LabCommandError("root", argv, p.returncode, p.stdout, p.stderr)
    return p.stdout


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


class Lab:
    """A NAT lab: one namespace per host, built from a :class:`Topology`.

    Use as a context manager (or call :meth:`up` and :meth:`down`)::

        with Lab(Topology.parse("easy,hard")) as lab:
            lab.run("a1", ["ip", "addr"])

    Hosts: ``inet`` (the internet router), every server (``stun`` by default), and per site ``<site>-nat``
    (its router) plus its LAN hosts (``<site>1``, ``<site>2``...; public hosts for ``nat="none"``).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        workdir: Path | str | None = None,
        lab_id: str | None = None,
        detached: bool = False,
    ) -> None:
        self.topology = topology
        self.id = lab_id or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-z]{1,8}", self.id):
            raise LabError(f"bad lab id {self.id!r}")
        self.prefix = f"{NETNS_PREFIX}{self.id}-"
        self.detached = detached
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.gettempdir()) / f"natlab-{self.id}"
        )
        self.hosts: dict[str, Host] = {}
        self.sites: dict[str, Site] = {}
        self._processes: list[LabProcess] = []
        self._is_up = False
        self._log_seq = 0
        self._allocate()

    # --- addressing -------------------------------------------------------------------------------

    def _ns(self, host: str) -> str:
        return self.prefix + host

    def _allocate(self) -> None:
        topo = self.topology
        self.hosts["inet"] = Host("inet", self._ns("inet"), "inet", ipv4=[_INET_V4], uplink="")
        for i, srv in enumerate(topo.servers):
            v4 = list(srv.ipv4) or (
                [f"198.51.100.{10 + 2 * i}", f"198.51.100.{11 + 2 * i}"] if srv.v4 else []
            )
            v6 = list(srv.ipv6) or (
                [f"2001:db8:100::{10 + 2 * i:x}", f"2001:db8:100::{11 + 2 * i:x}"] if srv.v6 else []
            )
            self.hosts[srv.name] = Host(srv.name, self._ns(srv.name), "server", ipv4=v4, ipv6=v6)
        public_seq = 0
        for i, spec in enumerate(topo.sites):
            kind = spec.kind
            hosts: list[Host] = []
            if kind.nat == "none":
                for name in spec.host_names:
                    public_seq += 1
                    h = Host(
                        name,
                        self._ns(name),
                        "public",
                        spec.name,
                        ipv4=[f"192.0.2.{9 + public_seq}"],
                        ipv6=[f"2001:db8:200::{9 + public_seq:x}"] if spec.has_ipv6 else [],
                    )
                    hosts.append(h)
                    self.hosts[name] = h
                self.sites[spec.name] = Site(spec, None, hosts, None, None, None)
                continue
            lan = ipaddress.IPv4Network(spec.lan_subnet or f"192.168.{i + 1}.0/24")
            lan6 = ipaddress.IPv6Network(f"2001:db8:1:{i + 1:x}::/64") if spec.has_ipv6 else None
            wan4 = (spec.public_ipv4 or f"203.0.113.{i + 2}") if kind.ipv4 else None
            lan_addrs = list(lan.hosts())
            router = Host(
                spec.router_name,
                self._ns(spec.router_name),
                "router",
                spec.name,
                ipv4=[wan4] if wan4 else [],
                uplink="wan",
            )
            self.hosts[router.name] = router
            for j, name in enumerate(spec.host_names):
                h = Host(
                    name,
                    self._ns(name),
                    "lan",
                    spec.name,
                    ipv4=[str(lan_addrs[j + 1])] if kind.ipv4 else [],
                    ipv6=[str(lan6[j + 2])] if lan6 else [],
                )
                hosts.append(h)
                self.hosts[name] = h
            self.sites[spec.name] = Site(
                spec, router, hosts, wan4, str(lan) if kind.ipv4 else None, str(lan6) if lan6 else None
            )

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in this lab (hosts: {', '.join(self.hosts)})") from None

    def site(self, name: str) -> Site:
        try:
            return self.sites[name]
        except KeyError:
            raise LabError(f"no site {name!r} in this lab (sites: {', '.join(self.sites)})") from None

    def site_of(self, host: str) -> Site:
        s = self.host(host).site
        if s is None:
            raise LabError(f"{host} belongs to no site")
        return self.sites[s]

    def server(self, name: str | None = None) -> Host:
        """A server host (the first one by default)."""
        if name is None:
            if not self.topology.servers:
                raise LabError("this lab has no server")
            name = self.topology.servers[0].name
        h = self.host(name)
        if h.role != "server":
            raise LabError(f"{name} is not a server")
        return h

    def _router_lan_v4(self, site: Site) -> str | None:
        if site.lan_subnet is None:
            return None
        return str(next(ipaddress.IPv4Network(site.lan_subnet).hosts()))

    def _router_lan_v6(self, site: Site) -> str | None:
        if site.lan_subnet6 is None:
            return None
        return str(ipaddress.IPv6Network(site.lan_subnet6)[1])

    def gateway(self, host: str) -> str:
        """The IPv4 (else IPv6) address of a LAN host's router on the LAN (NAT-PMP/UPnP gateway)."""
        site = self.site_of(host)
        gw = self._router_lan_v4(site) or self._router_lan_v6(site)
        if gw is None or self.host(host).role != "lan":
            raise LabError(f"{host} is not behind a router")
        return gw

    # --- build ------------------------------------------------------------------------------------

    def _state_path(self) -> Path:
        return state_root() / f"{self.id}.json"

    def _write_state(self) -> None:
        root = state_root()
        root.mkdir(parents=True, exist_ok=True)
        state = {
            "id": self.id,
            "prefix": self.prefix,
            "owner_pid": os.getpid(),
            "owner_start": _proc_start_time(os.getpid()),
            "detached": self.detached,
            "workdir": str(self.workdir),
            "own_workdir": self._own_workdir,
            "namespaces": [h.netns for h in self.hosts.values()],
            "pids": [p.pid for p in self._processes],
            "topology": self.topology.to_dict(),
            "hosts": {n: dataclasses.asdict(h) for n, h in self.hosts.items()},
        }
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self._state_path())

    def up(self) -> Lab:
        """Build the lab (about 0.3 s for two sites). On failure, whatever was built is torn down."""
        if self._is_up:
            return self
        missing = missing_tools()
        if missing:
            raise LabError(f"the lab needs: {', '.join(missing)}")
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_state()
        self._is_up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        logger.info("lab %s up in %.2fs (%d hosts)", self.id, time.monotonic() - t0, len(self.hosts))
        return self

    def _build(self) -> None:
        root_batch: list[str] = [f"netns add {h.netns}" for h in self.hosts.values()]
        per_ns_ip: dict[str, list[str]] = {h.name: ["link set lo up"] for h in self.hosts.values()}
        sysctls: dict[str, list[str]] = {
            h.name: [
                "net.ipv6.conf.all.keep_addr_on_down=1",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_ra=0",
                "net.ipv6.conf.default.accept_ra=0",
            ]
            for h in self.hosts.values()
        }
        nft: dict[str, str] = {}
        inet = self.hosts["inet"]
        sysctls["inet"] += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        per_ns_ip["inet"] += [f"addr add {_INET_V4}/32 dev lo"]

        def veth(a: Host, a_if: str, b: Host, b_if: str) -> None:
            root_batch.append(
                f"link add name {a_if} netns {a.netns} type veth peer name {b_if} netns {b.netns}"
            )
            for h, ifname in ((a, a_if), (b, b_if)):
                per_ns_ip[h.name] += [f"link set {ifname} addrgenmode none", f"link set {ifname} up"]

        def attach_to_inet(h: Host, ifname: str, v4: Sequence[str], v6_routes: Sequence[str]) -> None:
            """Link ``h`` to the internet router: /32 routes there, a default route via 192.0.2.1 here."""
            inet_if = f"v-{h.name}"
            veth(h, ifname, inet, inet_if)
            per_ns_ip["inet"].append(f"addr add {_INET_V6_LL}/64 dev {inet_if} nodad")
            per_ns_ip[h.name].append(f"addr add {_PEER_V6_LL}/64 dev {ifname} nodad")
            for a in v4:
                per_ns_ip["inet"].append(f"route replace {a}/32 dev {inet_if}")
            if v4:
                per_ns_ip[h.name] += [
                    f"route add {_INET_V4}/32 dev {ifname}",
                    f"route add default via {_INET_V4} dev {ifname}",
                ]
            for r in v6_routes:
                per_ns_ip["inet"].append(f"route replace {r} via {_PEER_V6_LL} dev {inet_if}")
            if v6_routes:
                per_ns_ip[h.name].append(f"route add default via {_INET_V6_LL} dev {ifname}")

        for srv in self.topology.servers:
            h = self.hosts[srv.name]
            for a in h.ipv4:
                per_ns_ip[h.name].append(f"addr add {a}/32 dev eth0")
            for a in h.ipv6:
                per_ns_ip[h.name].append(f"addr add {a}/128 dev eth0 nodad")
            attach_to_inet(h, "eth0", h.ipv4, [f"{a}/128" for a in h.ipv6])

        for site in self.sites.values():
            if site.router is None:
                for h in site.hosts:
                    for a in h.ipv4:
                        per_ns_ip[h.name].append(f"addr add {a}/32 dev eth0")
                    for a in h.ipv6:
                        per_ns_ip[h.name].append(f"addr add {a}/128 dev eth0 nodad")
                    attach_to_inet(h, "eth0", h.ipv4, [f"{a}/128" for a in h.ipv6])
                continue
            r = site.router
            sysctls[r.name] += [
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ]
            if site.spec.mapping_timeout:
                t = max(1, round(site.spec.mapping_timeout))
                sysctls[r.name] += [
                    f"net.netfilter.nf_conntrack_udp_timeout={t}",
                    f"net.netfilter.nf_conntrack_udp_timeout_stream={t}",
                ]
            if site.public_ipv4:
                per_ns_ip[r.name].append(f"addr add {site.public_ipv4}/32 dev wan")
            attach_to_inet(
                r,
                "wan",
                [site.public_ipv4] if site.public_ipv4 else [],
                [site.lan_subnet6] if site.lan_subnet6 else [],
            )
            per_ns_ip[r.name] += [
                "link add lan type bridge forward_delay 0 stp_state 0",
                "link set lan addrgenmode none",
                "link set lan up",
            ]
            lan_v4, lan_v6 = self._router_lan_v4(site), self._router_lan_v6(site)
            plen = ipaddress.IPv4Network(site.lan_subnet).prefixlen if site.lan_subnet else 0
            if lan_v4:
                per_ns_ip[r.name].append(f"addr add {lan_v4}/{plen} dev lan")
            if lan_v6:
                per_ns_ip[r.name] += [
                    f"addr add {lan_v6}/64 dev lan nodad",
                    "addr add fe80::1/64 dev lan nodad",
                ]
            for n, h in enumerate(site.hosts):
                port = f"p-{h.name}"
                veth(h, "eth0", r, port)
                per_ns_ip[r.name].append(f"link set {port} master lan")
                for a in h.ipv4:
                    per_ns_ip[h.name] += [f"addr add {a}/{plen} dev eth0", f"route add default via {lan_v4}"]
                for a in h.ipv6:
                    per_ns_ip[h.name] += [
                        f"addr add fe80::{n + 2:x}/64 dev eth0 nodad",
                        f"addr add {a}/64 dev eth0 nodad",
                        "route add default via fe80::1 dev eth0",
                    ]
            nft[r.name] = self._router_rules(site).render()
            if site.spec.has_port_mapping:
                nft[r.name] += _nft.miniupnpd_skeleton()

        _run(["ip", "-batch", "-"], input="\n".join(root_batch) + "\n")
        procs: list[tuple[str, subprocess.Popen[str]]] = []
        for h in self.hosts.values():
            script = [
                "set -e",
                "sysctl -q -e -w " + " ".join(sysctls[h.name]) + " >/dev/null",
                "ip -batch - <<'EOF'",
                *per_ns_ip[h.name],
                "EOF",
            ]
            if h.name in nft:
                script += ["nft -f - <<'EOF'", nft[h.name].rstrip("\n"), "EOF"]
            procs.append(
                (
                    h.name,
                    subprocess.Popen(
                        ["ip", "netns", "exec", h.netns, "sh", "-c", "\n".join(script) + "\n"],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
        errors = []
        for name, p in procs:
            out, err = p.communicate(timeout=30)
            if p.returncode != 0:
                errors.append(f"[{name}] exit {p.returncode}: {err.strip()} {out.strip()}")
        if errors:
            raise LabError("building the lab failed:\n" + "\n".join(errors))
        for site in self.sites.values():
            if site.spec.has_port_mapping:
                from ._miniupnpd import start_miniupnpd

                start_miniupnpd(self, site)

    def _router_rules(self, site: Site) -> _nft.RouterRules:
        return _nft.RouterRules(
            kind=site.spec.kind,
            filtering=site.spec.effective_filtering,
            wan_ipv4=site.public_ipv4,
            lan_subnet=site.lan_subnet,
            one2one_host=site.hosts[0].ipv4[0] if site.hosts and site.hosts[0].ipv4 else None,
            hairpin=site.spec.hairpin,
            mapping_timeout=site.spec.mapping_timeout,
        )

    # --- teardown ---------------------------------------------------------------------------------

    def down(self) -> None:
        """Tear everything down: processes (by PID), namespaces (and with them veths and nft tables)."""
        if not self._is_up:
            return
        self._is_up = False
        for p in reversed(self._processes):
            with contextlib.suppress(Exception):
                p.stop(timeout=1.0)
        _teardown(self.prefix, [h.netns for h in self.hosts.values()], [p.pid for p in self._processes])
        self._processes.clear()
        with contextlib.suppress(FileNotFoundError):
            self._state_path().unlink()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        logger.info("lab %s down", self.id)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    @property
    def is_up(self) -> bool:
        return self._is_up

    # --- running things ---------------------------------------------------------------------------

    def _check_up(self) -> None:
        if not self._is_up:
            raise LabError("the lab is not up")

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host`` and wait; LabCommandError (with its output) if it fails and ``check``."""
        self._check_up()
        h = self.host(host)
        p = subprocess.run(
            ["ip", "netns", "exec", h.netns, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self._env(env),
        )
        if check and p.returncode != 0:
            raise LabCommandError(host, argv, p.returncode, p.stdout, p.stderr)
        return p

    def spawn(
        self,
        host: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        stdin: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> LabProcess:
        """Start ``argv`` in the background in ``host``; stdout+stderr go to a log file in ``workdir``.

        The lab stops it (by PID) at teardown at the latest.
        """
        self._check_up()
        h = self.host(host)
        self._log_seq += 1
        name = name or Path(argv[0]).name
        logdir = self.workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        log_path = logdir / f"{self._log_seq:03d}-{host}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", h.netns, *argv],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                env=self._env(env),
                start_new_session=True,
            )
        proc = LabProcess(self, host, name, popen, log_path)
        self._processes.append(proc)
        self._write_state()
        logger.debug("spawned %r in %s: pid %d, log %s", list(argv), host, popen.pid, log_path)
        return proc

    @property
    def processes(self) -> list[LabProcess]:
        return list(self._processes)

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str] | None:
        if env is None:
            return None
        merged = dict(os.environ)
        merged.update(env)
        return merged

    @staticmethod
    def agent_argv(*args: str) -> list[str]:
        """argv running the lab's helper program (STUN server, probes, punch...) with this Python."""
        return [sys.executable, "-I", "-S", str(AGENT), *args]

    def agent(self, host: str, *args: str, timeout: float = 30.0) -> dict[str, Any]:
        """Run the helper program in ``host`` and return its last JSON line."""
        out = self.run(host, self.agent_argv(*args), timeout=timeout).stdout
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise LabError(f"agent {args[0]} in {host} printed nothing: {out!r}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    # --- link events ------------------------------------------------------------------------------

    def _ip(self, host: str, *cmds: str) -> None:
        self.run(host, ["ip", "-batch", "-"], input="\n".join(cmds) + "\n")

    def flush_nat(self, site: str) -> None:
        """Forget every NAT mapping of the site's router (conntrack table and filtering state)."""
        s = self.site(site)
        if s.router is None:
            raise LabError(f"site {site} has no NAT")
        self.run(
            s.router.name,
            [
                "sh",
                "-c",
                f"nft flush map inet {_nft.TABLE} eim; "
                f"nft flush set inet {_nft.TABLE} seen; conntrack -F 2>/dev/null || true",
            ],
        )

    def set_public_address(self, site: str, ipv4: str | None = None) -> str:
        """Give a NAT router a new public IPv4 address (the next free one in 203.0.113.0/24 by default).

        Mappings through the old address die with it, as on a real router renumbered by its ISP.
        """
        s = self.site(site)
        if s.router is None or s.public_ipv4 is None:
            raise LabError(f"site {site} has no public IPv4 address of its own")
        old = s.public_ipv4
        new = ipv4 or self._free_address("203.0.113.", 100)
        r = s.router
        self._ip("inet", f"route replace {new}/32 dev v-{r.name}")
        self._ip(r.name, f"addr add {new}/32 dev wan", f"addr del {old}/32 dev wan")
        r.ipv4 = [new]
        s.public_ipv4 = new
        rules = self._router_rules(s).render()
        self.run(r.name, ["nft", "-f", "-"], input=rules)
        self.run(r.name, ["sh", "-c", "conntrack -F 2>/dev/null || true"])
        self._ip("inet", f"route del {old}/32 dev v-{r.name}")
        self._write_state()
        return new

    def set_address(self, host: str, ipv4: str | None = None) -> str:
        """Give a host a new IPv4 address (LAN hosts: the next free one in the LAN; public hosts and
        servers: the next free one in their range). Sockets bound to the old address stop working."""
        h = self.host(host)
        if not h.ipv4:
            raise LabError(f"{host} has no IPv4 address")
        old = h.ipv4[0]
        if h.role == "lan":
            site = self.site_of(host)
            assert site.lan_subnet is not None
            net = ipaddress.IPv4Network(site.lan_subnet)
            plen = net.prefixlen
            if ipv4 is None:
                used = {a for x in site.hosts for a in x.ipv4} | {self._router_lan_v4(site)}
                ipv4 = next(str(a) for a in reversed(list(net.hosts())) if str(a) not in used)
            gw = self._router_lan_v4(site)
            self._ip(
                host,
                f"addr del {old}/{plen} dev eth0",
                f"addr add {ipv4}/{plen} dev eth0",
                f"route replace default via {gw}",
            )
            if site.spec.kind.nat == "one2one" and site.hosts[0] is h:
                h.ipv4[0] = ipv4
                assert site.router is not None
                self.run(site.router.name, ["nft", "-f", "-"], input=self._router_rules(site).render())
        elif h.role in ("public", "server"):
            ipv4 = ipv4 or self._free_address("192.0.2." if h.role == "public" else "198.51.100.", 150)
            self._ip("inet", f"route replace {ipv4}/32 dev v-{host}")
            self._ip(
                host,
                f"addr del {old}/32 dev eth0",
                f"addr add {ipv4}/32 dev eth0",
                f"route replace {_INET_V4}/32 dev eth0",
                f"route replace default via {_INET_V4} dev eth0",
            )
            self._ip("inet", f"route del {old}/32 dev v-{host}")
        else:
            raise LabError(f"cannot renumber {host} ({h.role}); use set_public_address for a NAT")
        h.ipv4[0] = ipv4
        self._write_state()
        return ipv4

    def _free_address(self, prefix: str, start: int) -> str:
        used = {a for h in self.hosts.values() for a in h.ipv4}
        for i in range(start, 255):
            if f"{prefix}{i}" not in used:
                return f"{prefix}{i}"
        raise LabError(f"no free address in {prefix}0/24")

    def link_down(self, host: str) -> None:
        """Take the host's uplink down (its ``eth0``, or ``wan`` for a router): nothing gets through."""
        h = self.host(host)
        if h.role == "inet":
            raise LabError("the internet router has no uplink")
        self._ip(host, f"link set {h.uplink} down")

    def link_up(self, host: str) -> None:
        """Bring the uplink back and restore its routes (as a DHCP client or router would)."""
        h = self.host(host)
        if h.role == "inet":
            raise LabError("the internet router has no uplink")
        cmds = [f"link set {h.uplink} up"]
        if h.role == "lan":
            site = self.site_of(host)
            if h.ipv4:
                cmds.append(f"route replace default via {self._router_lan_v4(site)} dev eth0")
            if h.ipv6:
                cmds.append("route replace default via fe80::1 dev eth0")
        else:
            if h.ipv4:
                cmds += [
                    f"route replace {_INET_V4}/32 dev {h.uplink}",
                    f"route replace default via {_INET_V4} dev {h.uplink}",
                ]
            if h.ipv6 or (h.role == "router" and self.site_of(host).lan_subnet6):
                cmds.append(f"route replace default via {_INET_V6_LL} dev {h.uplink}")
        self._ip(host, *cmds)

    def describe(self) -> str:
        """A human-readable table of the hosts and their addresses."""
        lines = [f"lab {self.id} (namespaces {self.prefix}*, logs in {self.workdir})"]
        for h in self.hosts.values():
            extra = ""
            if h.role == "router":
                s = self.sites[h.site or ""]
                extra = (
                    f"  nat={s.nat} lan={s.lan_subnet or ''}{' ' + s.lan_subnet6 if s.lan_subnet6 else ''}"
                )
                if s.spec.has_port_mapping:
                    extra += " miniupnpd"
            addrs = " ".join([*h.ipv4, *h.ipv6]) or "-"
            lines.append(f"  {h.name:<14} {h.role:<7} {h.netns:<28} {addrs}{extra}")
        return "\n".join(lines)


# --- teardown, also of stale labs -------------------------------------------------------------------


def _list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    try:
        out = _run(["ip", "netns", "pids", ns])
    except LabError:
        return []
    return [int(x) for x in out.split()]


def _kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _teardown(prefix: str, namespaces: Sequence[str], pids: Sequence[int]) -> None:
    existing = set(_list_netns())
    ours = [ns for ns in existing if ns.startswith(prefix)] + [
        ns for ns in namespaces if ns in existing and not ns.startswith(prefix)
    ]
    # Processes: those recorded, and any other still living in one of our namespaces.
    victims = set(pids)
    for ns in ours:
        victims.update(_netns_pids(ns))
    victims.discard(os.getpid())
    alive = [p for p in victims if _kill(p, signal.SIGKILL)]
    deadline = time.monotonic() + 5.0
    for p in alive:
        _reap(p)
        while Path(f"/proc/{p}").exists() and time.monotonic() < deadline:
            _reap(p)
            if _is_zombie(p):
                break
            time.sleep(0.005)
    if ours:
        _run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in ours))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def list_labs() -> list[dict[str, Any]]:
    """Recorded labs (from the state directory), each with ``alive`` (its owner still runs)."""
    labs = []
    root = state_root()
    if root.is_dir():
        for f in sorted(root.glob("*.json")):
            try:
                st: dict[str, Any] = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            pid = int(st.get("owner_pid", 0))
            st["alive"] = pid > 0 and _proc_start_time(pid) == st.get("owner_start")
            labs.append(st)
    return labs


def _teardown_state(st: Mapping[str, Any]) -> None:
    _teardown(str(st["prefix"]), list(st.get("namespaces", [])), [int(p) for p in st.get("pids", [])])
    with contextlib.suppress(FileNotFoundError):
        (state_root() / f"{st['id']}.json").unlink()
    if st.get("own_workdir") and st.get("workdir"):
        shutil.rmtree(str(st["workdir"]), ignore_errors=True)


def down_lab(lab_id: str) -> bool:
    """Tear down a recorded lab by id (e.g. one started by ``python -m natlib.testing up``)."""
    for st in list_labs():
        if st["id"] == lab_id:
            _teardown_state(st)
            return True
    prefix = f"{NETNS_PREFIX}{lab_id}-"
    if any(ns.startswith(prefix) for ns in _list_netns()):
        _teardown(prefix, [], [])
        return True
    return False


def down_all(*, stale_only: bool = True) -> list[str]:
    """Remove labs: with ``stale_only``, those whose owner process is gone (never detached CLI labs)
    plus any ``natlab-*`` namespace no recorded lab claims; otherwise every lab. Returns lab ids."""
    removed = []
    claimed: set[str] = set()
    for st in list_labs():
        if stale_only and (st["alive"] or st.get("detached")):
            claimed.add(str(st["prefix"]))
            continue
        _teardown_state(st)
        removed.append(str(st["id"]))
    orphans: dict[str, None] = {}
    for ns in _list_netns():
        if ns.startswith(NETNS_PREFIX) and not any(ns.startswith(p) for p in claimed):
            m = re.match(rf"{re.escape(NETNS_PREFIX)}([0-9a-z]+)-", ns)
            if m:
                orphans[m.group(1)] = None
    for lab_id in orphans:
        _teardown(f"{NETNS_PREFIX}{lab_id}-", [], [])
        removed.append(lab_id)
    return removed
