"""netcheck: what the network allows, and which relay region is nearest (nat-traversal §2).

One call measures, over STUN to every relay region of a :class:`~natlib.derpmap.DERPMap`:
whether UDP works over IPv4 and IPv6, the public addresses, whether the NAT maps differently per
destination (a "hard" NAT), each region's latency (over HTTPS when UDP is blocked), which
port-mapping protocols the gateway speaks, whether a captive portal intercepts HTTP, and the
home region, chosen with hysteresis over a 5-minute history::

    import anyio
    from natlib.derpmap import load_derp_map
    from natlib.netcheck import NetcheckState, netcheck

    async def main() -> None:
        derp_map = load_derp_map("derpmap.json")
        state = NetcheckState()                       # keep it: it carries the hysteresis
        report = await netcheck(derp_map, state=state)
        print(report.format_text(derp_map))

    anyio.run(main)                                   # or anyio.run(main, backend="trio")

The planning (:func:`plan_probes`, :class:`StopRule`), the report (:class:`ReportBuilder`) and
the home choice (:func:`choose_home`, :class:`LatencyHistory`) are sans-io: times are passed in.
"""

from ._home import HISTORY_WINDOW, LatencyHistory, choose_home
from ._plan import (
    ENOUGH_REGIONS,
    REPORT_TIMEOUT,
    STUN_PROBE_TIMEOUT,
    Probe,
    ProbePlan,
    StopRule,
    plan_probes,
    wants_full_report,
)
from ._report import Report, ReportBuilder
from ._run import NetcheckState, PortmapAvailability, PortmapProbe, https_latency, netcheck

__all__ = [
    "ENOUGH_REGIONS",
    "HISTORY_WINDOW",
    "REPORT_TIMEOUT",
    "STUN_PROBE_TIMEOUT",
    "LatencyHistory",
    "NetcheckState",
    "PortmapAvailability",
    "PortmapProbe",
    "Probe",
    "ProbePlan",
    "Report",
    "ReportBuilder",
    "StopRule",
    "choose_home",
    "https_latency",
    "netcheck",
    "plan_probes",
    "wants_full_report",
]
