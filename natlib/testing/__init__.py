"""natlib.testing: a real NAT lab in Linux network namespaces, for natlib's tests and for yours.

Needs root, iproute2, nftables and conntrack (``.ci/netlab-deps.sh`` installs them on Debian; the
port-mapping kinds also need the lab build of miniupnpd it makes). Everything runs in namespaces named
``natlab-<lab id>-<host>``; no namespace is connected to the machine's own interfaces, and the
"internet" uses documentation addresses only. See docs/netlab.md for the NAT kinds and their rules.

::

    from natlib.testing import Lab, Topology, start_stun_server, measure_mapping

    with Lab(Topology.parse("easy,hard")) as lab:       # sites a (easy) and b (hard), server "stun"
        stun = start_stun_server(lab)
        print(measure_mapping(lab, "a1", stun).behaviour)   # endpoint_independent
        lab.run("b1", ["python3", "my_program.py"])

pytest fixtures (``netlab``, ``netlab_module``, ``netlab_factory``, ``stun_server``) live in
:mod:`natlib.testing.pytest_plugin`; the CLI is ``python -m natlib.testing up|down|list``.
"""

from ._lab import (
    NETNS_PREFIX,
    Host,
    Lab,
    LabCommandError,
    LabError,
    LabProcess,
    Site,
    down_all,
    down_lab,
    list_labs,
    missing_tools,
)
from ._measure import (
    Endpoint,
    FilteringReport,
    MappingReport,
    PunchResult,
    StunServer,
    hole_punch,
    measure_filtering,
    measure_mapping,
    measure_tcp,
    start_stun_server,
)
from ._miniupnpd import find_miniupnpd
from ._spec import (
    FILTERINGS,
    MAPPINGS,
    NAT_KINDS,
    FilteringType,
    MappingType,
    NatKind,
    ServerSpec,
    SiteSpec,
    Topology,
    TopologyError,
)

__all__ = [
    "FILTERINGS",
    "MAPPINGS",
    "NAT_KINDS",
    "NETNS_PREFIX",
    "Endpoint",
    "FilteringReport",
    "FilteringType",
    "Host",
    "Lab",
    "LabCommandError",
    "LabError",
    "LabProcess",
    "MappingReport",
    "MappingType",
    "NatKind",
    "PunchResult",
    "ServerSpec",
    "Site",
    "SiteSpec",
    "StunServer",
    "Topology",
    "TopologyError",
    "down_all",
    "down_lab",
    "find_miniupnpd",
    "hole_punch",
    "list_labs",
    "measure_filtering",
    "measure_mapping",
    "measure_tcp",
    "missing_tools",
    "start_stun_server",
]
