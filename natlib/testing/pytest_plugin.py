"""pytest plugin shipped with natlib: the ``--fail-on-skip`` flag and the NAT lab fixtures.

Tests that need root, a network namespace or an external tool skip with a reason when run by a
developer without them. CI passes ``--fail-on-skip`` so that such a skip becomes a failure: a green
CI run then proves that every one of those tests really ran.

Enable it in a ``conftest.py`` with ``pytest_plugins = ["natlib.testing.pytest_plugin"]``.

Lab fixtures (every test using one is marked ``netlab`` and skips, with the reason, when not root or
when a tool is missing; ``--fail-on-skip`` turns those skips into failures):

``netlab``
    A fresh :class:`~natlib.testing.Lab` per test. Its topology comes from the test's marker,
    ``@pytest.mark.netlab("a=easy,b=hard")`` (the :meth:`Topology.parse` text form, or a
    :class:`Topology`), default ``"easy,easy"``; or from indirect parametrization
    (``@pytest.mark.parametrize("netlab", ["easy", "hard"], indirect=True)``).
``netlab_module``
    One lab per module, from the module's ``NETLAB_TOPOLOGY`` (text or Topology), default ``"easy,easy"``.
``netlab_factory``
    ``make(topology) -> Lab``: as many labs as a test wants, all torn down after it.
``netlab_stun``
    The lab's STUN server (:func:`~natlib.testing.start_stun_server`) running in ``netlab``.

Marker options: ``@pytest.mark.netlab(..., tools=["natpmpc"])`` skips unless those programs exist.
A site with port mapping (``easyPMP``/``hardPMP``) skips unless the lab build of miniupnpd exists.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Generator, Iterator, Sequence

import pytest

from ._lab import Lab, down_all, missing_tools
from ._measure import StunServer, start_stun_server
from ._miniupnpd import DEFAULT_MINIUPNPD, MINIUPNPD_ENV, find_miniupnpd
from ._spec import Topology

__all__ = [
    "netlab",
    "netlab_factory",
    "netlab_module",
    "netlab_stun",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_makereport",
    "pytest_runtest_setup",
    "skip_unless_netlab",
]

DEFAULT_TOPOLOGY = "easy,easy"
_LAB_FIXTURES = frozenset({"netlab", "netlab_module", "netlab_factory", "netlab_stun"})


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("natlib")
    group.addoption(
        "--fail-on-skip",
        action="store_true",
        default=False,
        help="turn every skipped test into a failure (CI uses this to prove that root/tool tests ran)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or not item.config.getoption("fail_on_skip"):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under --fail-on-skip: {reason}"


# --- the NAT lab ----------------------------------------------------------------------------------


def _as_topology(spec: object) -> Topology:
    if isinstance(spec, Topology):
        return spec
    if isinstance(spec, str):
        return Topology.parse(spec)
    raise TypeError(f"a lab topology is a Topology or its text form, not {spec!r}")


def skip_unless_netlab(topology: Topology | None = None, tools: Sequence[str] = ()) -> None:
    """pytest.skip (with the reason) unless the lab can run here: root, ip/nft/conntrack/sysctl,
    ``tools``, and the lab build of miniupnpd if ``topology`` has a port-mapping site."""
    missing = missing_tools()
    if missing:
        what = "not running as root" if missing == ["root"] else f"missing: {', '.join(missing)}"
        pytest.skip(
            f"netlab: {what} (the NAT lab needs root, iproute2, nftables, conntrack; see .ci/netlab-deps.sh)"
        )
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        pytest.skip(f"netlab: missing tool(s) {', '.join(absent)} (see .ci/netlab-deps.sh)")
    if topology is not None and any(s.has_port_mapping for s in topology.sites) and find_miniupnpd() is None:
        pytest.skip(
            f"netlab: the lab build of miniupnpd is missing ({DEFAULT_MINIUPNPD} or ${MINIUPNPD_ENV}; "
            "build it with .ci/netlab-deps.sh)"
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "netlab(topology=None, tools=()): needs root and the NAT lab tools (natlib.testing)"
    )


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        fixturenames = getattr(item, "fixturenames", ())
        if _LAB_FIXTURES.intersection(fixturenames) and item.get_closest_marker("netlab") is None:
            item.add_marker(pytest.mark.netlab)


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("netlab")
    if marker is not None:
        skip_unless_netlab(tools=tuple(marker.kwargs.get("tools", ())))


@pytest.fixture(scope="session")
def _netlab_session() -> None:
    # Leftovers of crashed earlier runs (their owner process is gone) would only waste resources.
    if not missing_tools():
        down_all(stale_only=True)


@pytest.fixture
def netlab_factory(
    _netlab_session: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Topology | str], Lab]]:
    """``make(topology)`` builds and returns a lab; every lab made is torn down after the test."""
    labs: list[Lab] = []

    def make(spec: Topology | str) -> Lab:
        topology = _as_topology(spec)
        skip_unless_netlab(topology)
        lab = Lab(topology, workdir=tmp_path_factory.mktemp("netlab"))
        labs.append(lab)
        return lab.up()

    yield make
    for lab in reversed(labs):
        lab.down()


@pytest.fixture
def netlab(request: pytest.FixtureRequest, netlab_factory: Callable[[Topology | str], Lab]) -> Lab:
    """A lab for this test; topology from ``@pytest.mark.netlab(...)`` or indirect parametrization."""
    spec: object = getattr(request, "param", None)
    if spec is None:
        marker = request.node.get_closest_marker("netlab")
        spec = marker.args[0] if marker is not None and marker.args else DEFAULT_TOPOLOGY
    return netlab_factory(_as_topology(spec))


@pytest.fixture(scope="module")
def netlab_module(
    request: pytest.FixtureRequest, _netlab_session: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    """One lab shared by the module's tests; topology from the module's ``NETLAB_TOPOLOGY``."""
    topology = _as_topology(getattr(request.module, "NETLAB_TOPOLOGY", DEFAULT_TOPOLOGY))
    skip_unless_netlab(topology)
    with Lab(topology, workdir=tmp_path_factory.mktemp("netlab")) as lab:
        yield lab


@pytest.fixture
def netlab_stun(netlab: Lab) -> StunServer:
    """The STUN server on the ``netlab`` lab's first server host (ports 3478 and 3479)."""
    return start_stun_server(netlab)
