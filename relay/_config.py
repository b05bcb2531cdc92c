"""The relay's configuration: derper's flags → a frozen :class:`RelayConfig`.

Every flag of ``cmd/derper`` is accepted with its default, so an operator's derper command line
works unchanged. Flags for features meshrelay does not have yet are accepted too, but setting one
to anything but its default is a startup error that says so: silently ignoring e.g.
``-verify-clients`` would open a relay the operator meant to close.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natlib.derp import parse_mesh_key
from natlib.keys import KeyFormatError, NodePrivateKey

from ._admission import validate_verify_url
from ._flags import FlagSet
from ._mesh import MeshTarget, parse_mesh_with
from ._transport import IDLE_SPIN_SECONDS

__all__ = [
    "ConfigError",
    "RelayConfig",
    "build_flagset",
    "config_from_args",
    "default_workers",
    "load_or_create_key",
    "parse_listen_addr",
]

DEV_ADDR = ":3340"
DEFAULT_METRICS_ADDR = "127.0.0.1:9380"  # loopback only; 9090 is Prometheus's own port
DEFAULT_KEY_PATH = "/var/lib/derper/derper.key"
MESH_KEY_ENV = "TAILSCALE_DERPER_MESH_KEY"
MAX_WORKERS = 256

# Flags accepted for compatibility whose features are not implemented: (name, why / what instead).
_UNSUPPORTED = {
    "verify-clients": "client verification through a local tailscaled is not supported",
    "secrets-url": "setec secrets are not supported; use -mesh-psk-file",
    "bootstrap-dns-names": "/bootstrap-dns is not supported",
    "unpublished-bootstrap-dns-names": "/bootstrap-dns is not supported",
    "ace": "the experimental CONNECT proxy is not supported",
    "acme-ip-certs": "ACME certificates are not supported; use -certmode manual",
    "acme-eab-kid": "ACME certificates are not supported; use -certmode manual",
    "acme-eab-key": "ACME certificates are not supported; use -certmode manual",
    "acme-email": "ACME certificates are not supported; use -certmode manual",
    "socket": "client verification through a local tailscaled is not supported",
}


class ConfigError(Exception):
    """A configuration problem; the message names the flag or file at fault."""


def _default_certdir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "tailscale" / "derper-certs")


def _default_mesh_psk_file() -> str:
    for candidate in ("/home/derp/keys/derp-mesh.key", str(Path.home() / "keys" / "derp-mesh.key")):
        if Path(candidate).exists():
            return candidate
    return ""


def build_flagset() -> FlagSet:
    fs = FlagSet("meshrelay")
    fs.add_bool("dev", False, "run in localhost development mode (overrides -a)")
    fs.add_bool("version", False, "print version and exit")
    fs.add_string(
        "a",
        ":443",
        'server HTTP/HTTPS listen address, in form ":port", "ip:port", or for IPv6 "[ip]:port". If the IP is omitted, it defaults to all interfaces. Serves HTTPS if the port is 443 and/or -certmode is manual, otherwise HTTP.',
    )
    fs.add_int(
        "http-port",
        80,
        "The port on which to serve HTTP. Set to -1 to disable. The listener is bound to the same IP (if any) as specified in the -a flag.",
    )
    fs.add_int(
        "stun-port",
        3478,
        "The UDP port on which to serve STUN. The listener is bound to the same IP (if any) as specified in the -a flag.",
    )
    fs.add_string(
        "c", "", 'config file path (JSON {"PrivateKey":"privkey:..."}; created with mode 0600 if missing)'
    )
    fs.add_string(
        "certmode",
        "letsencrypt",
        "mode for getting a cert. possible options: manual, letsencrypt (meshrelay supports manual only)",
    )
    fs.add_string(
        "certdir", _default_certdir(), "directory to store LetsEncrypt certs, if addr's port is :443"
    )
    fs.add_string(
        "hostname",
        "derp.tailscale.com",
        "LetsEncrypt host name, if addr's port is :443. When --certmode=manual, this can be an IP address to avoid SNI checks",
    )
    fs.add_bool(
        "stun",
        True,
        "whether to run a STUN server. It will bind to the same IP (if any) as the --addr flag value.",
    )
    fs.add_bool(
        "derp",
        True,
        "whether to run a DERP server. The only reason to set this false is if you're decommissioning a server but want to keep its bootstrap DNS functionality still running.",
    )
    fs.add_string(
        "home",
        "",
        'what to serve at the root path. It may be left empty (the default, for a default homepage), "blank" for a blank page, or a URL to redirect to',
    )
    fs.add_string(
        "mesh-psk-file",
        _default_mesh_psk_file(),
        "if non-empty, path to file containing the mesh pre-shared key file. It must be 64 lowercase hexadecimal characters; whitespace is trimmed.",
    )
    fs.add_string(
        "mesh-with",
        "",
        "optional comma-separated list of hostnames to mesh with; the server's own hostname can be in the list. If an entry contains a slash, the second part names a hostname to be used when dialing the target.",
    )
    fs.add_string("secrets-url", "", "SETEC server URL for secrets retrieval of mesh key")
    fs.add_string(
        "secrets-path-prefix", "prod/derp", 'setec path prefix for "meshkey" secret for DERP mesh key'
    )
    fs.add_string(
        "secrets-cache-dir",
        str(Path.home() / ".cache" / "derper-secrets"),
        "directory to cache setec secrets in (required if --secrets-url is set)",
    )
    fs.add_string(
        "bootstrap-dns-names",
        "",
        "optional comma-separated list of hostnames to make available at /bootstrap-dns",
    )
    fs.add_string(
        "unpublished-bootstrap-dns-names",
        "",
        "optional comma-separated list of hostnames to make available at /bootstrap-dns and not publish in the list. If an entry contains a slash, the second part names a DNS record to poll for its TXT record with a `0` to `100` value for rollout percentage.",
    )
    fs.add_bool(
        "verify-clients", False, "verify clients to this DERP server through a local tailscaled instance."
    )
    fs.add_string(
        "verify-client-url",
        "",
        'if non-empty, an admission controller URL for permitting client connections; see tailcfg.DERPAdmitClientRequest (POST {"NodePublic","Source"}, admitted on 200 with {"Allow":true}; 5s timeout; headscale\'s /verify works)',
    )
    fs.add_bool(
        "verify-client-url-fail-open", True, "whether we fail open if --verify-client-url is unreachable"
    )
    fs.add_string(
        "socket",
        "",
        "optional alternate path to tailscaled socket (only relevant when using --verify-clients)",
    )
    fs.add_float(
        "accept-connection-limit",
        math.inf,
        "rate limit for accepting new connection (per second, TLS listener only; over the limit a connection is accepted and closed at once)",
    )
    fs.add_int("accept-connection-burst", sys.maxsize, "burst limit for accepting new connection")
    fs.add_string(
        "rate-config",
        "",
        'path to a JSON file with per-client rate limits, reloaded on SIGHUP: {"PerClientRateLimitBytesPerSec":N,"PerClientRateBurstBytes":M} (receive side; reads pause, nothing is dropped; burst at least 65568; rate 0 disables; mesh peers are exempt)',
    )
    fs.add_duration("tcp-keepalive-time", 600.0, "TCP keepalive time")
    fs.add_duration("tcp-user-timeout", 15.0, "TCP user timeout")
    fs.add_duration(
        "tcp-write-timeout", 2.0, "TCP write timeout; 0 results in no timeout being set on writes"
    )
    fs.add_bool(
        "ace",
        False,
        "whether to enable embedded ACE server [experimental + in-development as of 2025-09-12; not yet documented]",
    )
    fs.add_string(
        "acme-eab-kid", "", "ACME External Account Binding (EAB) Key ID (required for --certmode=gcp)"
    )
    fs.add_string(
        "acme-eab-key",
        "",
        "ACME External Account Binding (EAB) HMAC key, base64-encoded (required for --certmode=gcp)",
    )
    fs.add_string(
        "acme-email",
        "",
        "ACME account contact email address (required for --certmode=gcp, optional for letsencrypt)",
    )
    fs.add_bool("acme-ip-certs", False, "enable ACME certificates for IP addresses")
    # meshrelay's own flags
    fs.add_string(
        "allow-file",
        "",
        'if non-empty, only these node keys may connect (mesh peers always may): a file with one nodekey:<hex> per line (# comments), or a *.toml file of [[node]] tables with node_key = "nodekey:<hex>"; reloaded on SIGHUP (meshrelay)',
    )
    fs.add_string("log-level", "info", "log level: debug, info, warning or error (meshrelay)")
    fs.add_duration(
        "idle-spin",
        IDLE_SPIN_SECONDS,
        "while traffic is interactive, poll the client sockets this long before the relay sleeps (like Go's scheduler; lower latency for some CPU between packets); 0 turns it off (meshrelay)",
    )
    fs.add_duration(
        "shutdown-grace",
        5.0,
        "on SIGTERM, tell every client to reconnect (DERP Restarting frame), stop accepting and wait this long for clients to leave before closing the rest; 0 closes at once (meshrelay)",
    )
    fs.add_duration(
        "restart-reconnect-in",
        1.0,
        "in the Restarting frame sent on SIGTERM: how long clients should wait before reconnecting (meshrelay)",
    )
    fs.add_duration(
        "restart-try-for",
        30.0,
        "in the Restarting frame sent on SIGTERM: how long clients should keep trying to reconnect (meshrelay)",
    )
    fs.add_string(
        "metrics-addr",
        DEFAULT_METRICS_ADDR,
        'listen address for Prometheus metrics at /metrics, "ip:port" or "[ip]:port" (no IP: all interfaces); "" or "off" disables it (meshrelay; see docs/metrics.md)',
    )
    cores = default_workers()
    fs.add_int(
        "workers",
        cores,
        "number of relay processes sharing the listen ports (SO_REUSEPORT), meshed with each other over loopback so any client reaches any other; 1 serves in this process; the default is the number of CPUs this process may run on (its CPU affinity, capped by a cgroup CPU quota) (meshrelay; see docs/run-a-region.md)",
    )
    # Internal: set by the -workers supervisor on the processes it starts (see relay/_workers.py).
    fs.add_bool("internal-worker", False, "internal: run as a worker of a -workers supervisor", hidden=True)
    return fs


def default_workers() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core node has all 64 in its affinity mask but may use
    only 2 (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``): it gets 2 workers, not 64.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs allowed by this process's cgroup (v2, else v1), or None if unlimited or unknown."""
    own = ""
    try:
        for line in self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:].strip().lstrip("/")
    except OSError:
        pass
    for cpu_max in dict.fromkeys([root / own / "cpu.max", root / "cpu.max"]):
        try:
            text = cpu_max.read_text().split()
        except OSError:
            continue
        try:
            return None if text[0] == "max" else int(text[0]) / int(text[1])
        except (ValueError, IndexError):
            return None
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_metrics_addr(addr: str) -> tuple[str, int] | None:
    """``-metrics-addr``: ``""``/``"off"`` → None, else (host or "", port) as for ``-a``."""
    if addr.strip() in ("", "off"):
        return None
    try:
        return parse_listen_addr(addr)
    except ConfigError as e:
        raise ConfigError(f"-metrics-addr: {str(e).removeprefix('-a ')}") from None


def parse_listen_addr(addr: str) -> tuple[str, int]:
    """``":443"``, ``"1.2.3.4:443"``, ``"[::1]:3340"`` → (host or "", port)."""
    host, sep, port_s = addr.rpartition(":")
    if not sep:
        raise ConfigError(f'-a {addr!r}: want ":port", "ip:port" or "[ip]:port"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    named = {"https": 443, "http": 80}
    try:
        port = named[port_s] if port_s in named else int(port_s)
    except ValueError:
        raise ConfigError(f"-a {addr!r}: bad port {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"-a {addr!r}: port out of range")
    return host, port


@dataclass(frozen=True)
class RelayConfig:
    dev: bool
    listen_host: str
    listen_port: int
    tls: bool
    http_port: int
    stun: bool
    stun_port: int
    derp: bool
    key_path: str  # "" = a fresh random key for this run (-dev)
    certmode: str
    certdir: str
    hostname: str
    home: str
    mesh_key: bytes | None
    mesh_with: tuple[MeshTarget, ...]
    write_timeout: float
    tcp_keepalive_time: float
    tcp_user_timeout: float
    log_level: str
    shutdown_grace: float
    idle_spin: float
    restart_reconnect_in: float
    restart_try_for: float
    metrics_addr: tuple[str, int] | None  # None: no metrics listener
    verify_client_url: str = ""
    verify_client_url_fail_open: bool = True
    allow_file: str = ""
    rate_config: str = ""
    accept_connection_limit: float = math.inf
    accept_connection_burst: int = sys.maxsize
    workers: int = 1
    internal_worker: bool = False


def config_from_args(values: dict[str, Any], given: set[str], *, is_root: bool | None = None) -> RelayConfig:
    """Validate parsed flags; raise :class:`ConfigError` naming the flag at fault."""
    for name, why in _UNSUPPORTED.items():
        if name in given and values[name] != build_flagset().flags[name].default:
            raise ConfigError(f"-{name}: {why}")
    dev = bool(values["dev"])
    addr = DEV_ADDR if dev else str(values["a"])
    host, port = parse_listen_addr(addr)
    certmode = str(values["certmode"])
    if certmode not in ("manual", "letsencrypt", "gcp"):
        raise ConfigError(f"-certmode {certmode!r}: unknown mode (want manual)")
    tls = not dev and (port == 443 or certmode == "manual")
    if tls and certmode != "manual":
        raise ConfigError(
            f"-certmode {certmode}: meshrelay does not obtain ACME certificates; "
            "use -certmode manual with -certdir and -hostname (an IP hostname gets a self-signed "
            "certificate), or serve plain HTTP on a port other than 443"
        )
    http_port = int(values["http-port"])
    if not -1 <= http_port <= 65535:
        raise ConfigError(f"-http-port {http_port}: out of range")
    stun_port = int(values["stun-port"])
    if not 0 <= stun_port <= 65535:
        raise ConfigError(f"-stun-port {stun_port}: out of range")
    if is_root is None:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    key_path = str(values["c"])
    if not key_path and not dev:
        if not is_root:
            raise ConfigError("-c: no key file given (use -c FILE, or -dev for a throwaway key)")
        key_path = DEFAULT_KEY_PATH
    mesh_key: bytes | None = None
    psk_file = str(values["mesh-psk-file"])
    if psk_file:
        try:
            text = Path(psk_file).read_text()
        except OSError as e:
            raise ConfigError(f"-mesh-psk-file {psk_file}: {e.strerror or e}") from None
        try:
            mesh_key = parse_mesh_key(text)
        except ValueError as e:
            raise ConfigError(f"-mesh-psk-file {psk_file}: {e}") from None
    elif dev and os.environ.get(MESH_KEY_ENV):
        try:
            mesh_key = parse_mesh_key(os.environ[MESH_KEY_ENV])
        except ValueError as e:
            raise ConfigError(f"${MESH_KEY_ENV}: {e}") from None
    try:
        mesh_with = tuple(parse_mesh_with(str(values["mesh-with"]), port))
    except ValueError as e:
        raise ConfigError(f"-mesh-with: {e}") from None
    if mesh_with and mesh_key is None:
        raise ConfigError(
            "-mesh-with: meshing needs a mesh key (-mesh-psk-file, or $TAILSCALE_DERPER_MESH_KEY with -dev)"
        )
    write_timeout = float(values["tcp-write-timeout"])
    if write_timeout < 0:
        raise ConfigError("-tcp-write-timeout: must not be negative")
    level = str(values["log-level"]).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"-log-level {level!r}: want debug, info, warning or error")
    metrics_addr = parse_metrics_addr(str(values["metrics-addr"]))
    verify_url = str(values["verify-client-url"]).strip()
    if verify_url:
        try:
            validate_verify_url(verify_url)
        except ValueError as e:
            raise ConfigError(f"-verify-client-url {e}") from None
    accept_limit = float(values["accept-connection-limit"])
    if math.isnan(accept_limit) or accept_limit < 0:
        raise ConfigError(f"-accept-connection-limit {accept_limit}: must be a non-negative rate (or +Inf)")
    accept_burst = int(values["accept-connection-burst"])
    if accept_burst < 0:
        raise ConfigError(f"-accept-connection-burst {accept_burst}: must not be negative")
    workers = int(values["workers"])
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"-workers {workers}: want 1 to {MAX_WORKERS} relay processes")
    return RelayConfig(
        dev=dev,
        listen_host=host,
        listen_port=port,
        tls=tls,
        http_port=http_port,
        stun=bool(values["stun"]),
        stun_port=stun_port,
        derp=bool(values["derp"]),
        key_path=key_path,
        certmode=certmode,
        certdir=str(values["certdir"]),
        hostname=str(values["hostname"]),
        home=str(values["home"]),
        mesh_key=mesh_key,
        mesh_with=mesh_with,
        write_timeout=write_timeout,
        tcp_keepalive_time=float(values["tcp-keepalive-time"]),
        tcp_user_timeout=float(values["tcp-user-timeout"]),
        log_level=level,
        metrics_addr=metrics_addr,
        shutdown_grace=_non_negative(values, "shutdown-grace"),
        idle_spin=_non_negative(values, "idle-spin"),
        restart_reconnect_in=_non_negative(values, "restart-reconnect-in"),
        restart_try_for=_non_negative(values, "restart-try-for"),
        verify_client_url=verify_url,
        verify_client_url_fail_open=bool(values["verify-client-url-fail-open"]),
        allow_file=str(values["allow-file"]),
        rate_config=str(values["rate-config"]),
        accept_connection_limit=accept_limit,
        accept_connection_burst=accept_burst,
        workers=workers,
        internal_worker=bool(values["internal-worker"]),
    )


def _non_negative(values: dict[str, Any], name: str) -> float:
    v = float(values[name])
    if v < 0:
        raise ConfigError(f"-{name}: must not be negative")
    return v


def load_or_create_key(path: str) -> NodePrivateKey:
    """Read derper's key file ``{"PrivateKey":"privkey:<hex>"}``; create it (0600) if missing."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        key = NodePrivateKey.generate()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"PrivateKey": key.text()}, indent="\t") + "\n")
        except OSError as e:
            raise ConfigError(f"{path}: cannot create key file: {e.strerror or e}") from None
        return key
    except OSError as e:
        raise ConfigError(f"{path}: cannot read key file: {e.strerror or e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict) or "PrivateKey" not in obj:
        raise ConfigError(f'{path}: field "PrivateKey" is missing')
    value = obj["PrivateKey"]
    line = next((i for i, ln in enumerate(text.splitlines(), 1) if "PrivateKey" in ln), 1)
    if not isinstance(value, str):
        raise ConfigError(f'{path}:{line}: field "PrivateKey" must be a string "privkey:<64 hex>"')
    try:
        return NodePrivateKey.from_text(value)
    except KeyFormatError as e:
        raise ConfigError(f'{path}:{line}: field "PrivateKey": {e}') from None
