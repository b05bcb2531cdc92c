"""Measuring a lab host's NAT with the lab's STUN server: mapping, filtering, TCP, hole punching."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._lab import Lab, LabError, LabProcess
from ._spec import FilteringType, MappingType

__all__ = [
    "Endpoint",
    "FilteringReport",
    "MappingReport",
    "PunchResult",
    "StunServer",
    "hole_punch",
    "measure_filtering",
    "measure_mapping",
    "measure_tcp",
    "start_stun_server",
]

Endpoint = tuple[str, int]
Family = Literal[4, 6]


def fmt_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ep(v: Any) -> Endpoint | None:
    return None if v is None else (str(v[0]), int(v[1]))


@dataclass(frozen=True)
class StunServer:
    """The lab's STUN server (RFC 5389 Binding over UDP and TCP, RFC 5780 CHANGE-REQUEST) on every
    address of a server host, ports ``ports`` (the second port and address answer changed requests)."""

    host: str
    process: LabProcess
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    ports: tuple[int, ...]

    def address(self, family: Family = 4, index: int = 0) -> str:
        addrs = self.ipv4 if family == 4 else self.ipv6
        if not addrs:
            raise LabError(f"the STUN server has no IPv{family} address")
        return addrs[index % len(addrs)]

    def endpoint(self, family: Family = 4, index: int = 0, port_index: int = 0) -> Endpoint:
        return self.address(family, index), self.ports[port_index % len(self.ports)]

    def endpoint_str(self, family: Family = 4, index: int = 0, port_index: int = 0) -> str:
        return fmt_endpoint(*self.endpoint(family, index, port_index))

    def stop(self) -> None:
        self.process.stop()


def start_stun_server(lab: Lab, host: str | None = None, ports: Sequence[int] = (3478, 3479)) -> StunServer:
    """Start the lab's STUN server on all addresses of ``host`` (the first server by default)."""
    h = lab.server(host)
    args = ["stun-server"]
    for a in (*h.ipv4, *h.ipv6):
        args += ["--address", a]
    for p in ports:
        args += ["--port", str(p)]
    proc = lab.spawn(h.name, lab.agent_argv(*args), name="stun-server")
    proc.wait_for_output(r'^\{"ready"', timeout=10.0)
    return StunServer(h.name, proc, tuple(h.ipv4), tuple(h.ipv6), tuple(ports))


@dataclass(frozen=True)
class MappingReport:
    """What the STUN server saw from one socket of ``host``, toward (A, P), (A, P') and (B, P)."""

    local_port: int
    mapped: tuple[Endpoint | None, ...]

    @property
    def behaviour(self) -> MappingType | Literal["blocked"]:
        seen = [m for m in self.mapped if m is not None]
        if len(seen) < len(self.mapped):
            return "blocked"
        return "endpoint_independent" if len(set(seen)) == 1 else "endpoint_dependent"

    @property
    def ports(self) -> tuple[int | None, ...]:
        return tuple(m[1] if m else None for m in self.mapped)

    @property
    def port_preserved(self) -> bool:
        return all(m is not None and m[1] == self.local_port for m in self.mapped)


def measure_mapping(
    lab: Lab, host: str, stun: StunServer, *, port: int = 0, family: Family = 4, timeout: float = 2.0
) -> MappingReport:
    """Send Binding requests from one UDP socket (bound to ``port``) to three server endpoints.

    Each request is retried for up to ``timeout`` seconds (no answer: that endpoint is ``None``)."""
    servers = [stun.endpoint(family, 0, 0), stun.endpoint(family, 0, 1), stun.endpoint(family, 1, 0)]
    bind = fmt_endpoint("::" if family == 6 else "0.0.0.0", port)
    args = ["probe-mapping", "--bind", bind, "--timeout", str(timeout)]
    for s in servers:
        args += ["--server", fmt_endpoint(*s)]
    out = lab.agent(host, *args)
    return MappingReport(int(out["local"][1]), tuple(_ep(m) for m in out["mapped"]))


@dataclass(frozen=True)
class FilteringReport:
    """Which unsolicited answers reached a socket that had sent only to the server's (A, P).

    ``other_port``: from (A, P'); ``other_addr``: from (B, P); ``other_addr_port``: from (B, P').
    """

    mapped: Endpoint | None
    other_port: bool
    other_addr: bool
    other_addr_port: bool

    @property
    def behaviour(self) -> FilteringType | Literal["blocked"]:
        if self.mapped is None:
            return "blocked"
        if self.other_addr and self.other_addr_port:
            return "endpoint_independent"
        if self.other_port:
            return "address_dependent"
        return "address_and_port_dependent"


def measure_filtering(
    lab: Lab, host: str, stun: StunServer, *, port: int = 0, family: Family = 4, timeout: float = 2.0
) -> FilteringReport:
    """RFC 5780 filtering tests (CHANGE-REQUEST), each followed by a control request on the same path.

    A changed answer counts as blocked once the control answer, sent after it, has arrived (plus a
    150 ms grace period for reordering)."""
    bind = fmt_endpoint("::" if family == 6 else "0.0.0.0", port)
    out = lab.agent(
        host,
        "probe-filtering",
        "--bind",
        bind,
        "--server",
        stun.endpoint_str(family),
        "--timeout",
        str(timeout),
    )
    return FilteringReport(
        _ep(out["mapped"]), bool(out["other_port"]), bool(out["other_addr"]), bool(out["other_addr_port"])
    )


def measure_tcp(
    lab: Lab, host: str, stun: StunServer, *, family: Family = 4, timeout: float = 3.0
) -> Endpoint | None:
    """The source address the server sees on a TCP connection from ``host`` (None: no connection)."""
    out = lab.agent(host, "probe-tcp", "--server", stun.endpoint_str(family), "--timeout", str(timeout))
    return _ep(out["mapped"])


@dataclass(frozen=True)
class PunchResult:
    """Plain-socket hole punching between two hosts: each side's STUN-mapped endpoint, and for each
    side the source its peer's packets came from (None if nothing got through)."""

    mapped_a: Endpoint | None
    mapped_b: Endpoint | None
    a_heard_from: Endpoint | None
    b_heard_from: Endpoint | None

    @property
    def ok(self) -> bool:
        return self.a_heard_from is not None and self.b_heard_from is not None


def hole_punch(
    lab: Lab,
    a: str,
    b: str,
    stun: StunServer,
    *,
    port_a: int = 41641,
    port_b: int = 41641,
    family: Family = 4,
    timeout: float = 3.0,
) -> PunchResult:
    """Each host learns its public endpoint from the STUN server (same socket), the endpoints are
    exchanged (as a signalling channel would), then both send to each other every 50 ms until each
    has heard the other or ``timeout`` passes."""
    procs: list[LabProcess] = []
    any_addr = "::" if family == 6 else "0.0.0.0"
    try:
        for host, port in ((a, port_a), (b, port_b)):
            procs.append(
                lab.spawn(
                    host,
                    lab.agent_argv(
                        "punch",
                        "--bind",
                        fmt_endpoint(any_addr, port),
                        "--stun",
                        stun.endpoint_str(family),
                        "--timeout",
                        str(timeout),
                    ),
                    name="punch",
                    stdin=True,
                )
            )
        mapped: list[Endpoint | None] = []
        for p in procs:
            m = p.wait_for_output(r'^\{"mapped".*$', timeout=10.0)
            mapped.append(_ep(json.loads(m.group(0))["mapped"]))
        if mapped[0] is None or mapped[1] is None:
            return PunchResult(mapped[0], mapped[1], None, None)
        procs[0].write_line(json.dumps({"peer": list(mapped[1])}))
        procs[1].write_line(json.dumps({"peer": list(mapped[0])}))
        heard: list[Endpoint | None] = []
        for p in procs:
            p.wait(timeout + 10.0)
            res = [x for x in p.json_lines() if "result" in x]
            if not res:
                raise LabError(f"punch in {p.host} printed no result:\n{p.output()}")
            heard.append(_ep(res[-1]["from"]))
        return PunchResult(mapped[0], mapped[1], heard[0], heard[1])
    finally:
        for p in procs:
            p.stop()
