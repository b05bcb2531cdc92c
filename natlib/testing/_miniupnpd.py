"""miniupnpd (NAT-PMP, PCP, UPnP IGD) on a lab router, using the lab build of Debian's package."""

from __future__ import annotations

import ipaddress
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final

from . import _nft

if TYPE_CHECKING:
    from ._lab import Lab, LabProcess, Site

__all__ = ["DEFAULT_MINIUPNPD", "MINIUPNPD_ENV", "find_miniupnpd", "start_miniupnpd"]

MINIUPNPD_ENV: Final = "NATLIB_TESTING_MINIUPNPD"
DEFAULT_MINIUPNPD: Final = Path("/var/cache/meshrelay-netlab/miniupnpd")
UPNP_PORT: Final = 5000
PMP_PORT: Final = 5351


def find_miniupnpd() -> Path | None:
    """The lab build of miniupnpd: ``$NATLIB_TESTING_MINIUPNPD``, else the cache path that
    ``.ci/netlab-deps.sh`` builds into. Debian's stock binary refuses documentation-range addresses,
    so it is deliberately not looked up on PATH."""
    env = os.environ.get(MINIUPNPD_ENV)
    candidate = Path(env) if env else DEFAULT_MINIUPNPD
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    return None


def _config(site: Site) -> str:
    assert site.lan_subnet is not None
    net = ipaddress.IPv4Network(site.lan_subnet)
    return "\n".join(
        [
            "ext_ifname=wan",
            "listening_ip=lan",
            f"port={UPNP_PORT}",
            "enable_natpmp=yes",
            "enable_upnp=yes",
            "secure_mode=no",
            "system_uptime=yes",
            f"uuid={uuid.uuid4()}",
            f"upnp_table_name={_nft.MINIUPNPD_TABLE}",
            f"upnp_nat_table_name={_nft.MINIUPNPD_TABLE}",
            "upnp_forward_chain=miniupnpd",
            "upnp_nat_chain=prerouting_miniupnpd",
            "upnp_nat_postrouting_chain=postrouting_miniupnpd",
            f"allow 1024-65535 {net} 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ]
    )


def start_miniupnpd(lab: Lab, site: Site) -> LabProcess:
    """Start miniupnpd in the site's router and wait until it serves NAT-PMP/PCP and UPnP."""
    from ._lab import LabError

    binary = find_miniupnpd()
    if binary is None:
        raise LabError(
            f"the lab build of miniupnpd is missing (set {MINIUPNPD_ENV} or run .ci/netlab-deps.sh to build "
            f"{DEFAULT_MINIUPNPD})"
        )
    if site.router is None or site.lan_subnet is None:
        raise LabError(f"site {site.name}: miniupnpd needs an IPv4 NAT router")
    d = lab.workdir / "miniupnpd" / site.name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "miniupnpd.conf"
    conf.write_text(_config(site))
    # A private copy is not needed; the pid file must be per-lab (miniupnpd refuses to start twice).
    proc = lab.spawn(
        site.router.name,
        [str(binary), "-f", str(conf), "-d", "-P", str(d / "miniupnpd.pid")],
        name=f"miniupnpd-{site.name}",
    )
    proc.wait_for_output(r"Listening for NAT-PMP", timeout=10.0)
    proc.wait_for_output(r"HTTP listening on port", timeout=10.0)
    return proc


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None
