"""Relay maps: Tailscale's DERPMap JSON and headscale's YAML form, parsed and validated.

A relay map lists regions, each with relay nodes in priority order (derp-protocol §8). Two
spellings are read:

* **Tailscale JSON** (``tailcfg.DERPMap``): Go field names (``Regions``, ``RegionID``,
  ``STUNPort``...). Go's decoder matches keys case-insensitively, and so does this one.
* **headscale YAML**: the same fields lower-cased (``regions``, ``regionid``, ``stunport``...),
  region keys as integers.

:func:`load_derp_map` and :func:`parse_derp_map` return an immutable :class:`DERPMap`; every
problem is a :class:`DERPMapError` whose message names the file, the line where known (YAML
fields and JSON syntax errors) and the field path, e.g.
``derp.yaml:14: regions[900].nodes[0].stunport: must be an integer from -1 to 65535, got 'x'``.
Unknown fields are ignored, as Go does, so newer maps still load.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

__all__ = [
    "CERT_PIN_PREFIX",
    "DEFAULT_DERP_PORT",
    "DEFAULT_STUN_PORT",
    "DERPMap",
    "DERPMapError",
    "DERPNode",
    "DERPRegion",
    "load_derp_map",
    "parse_derp_map",
]

DEFAULT_STUN_PORT: Final = 3478
DEFAULT_DERP_PORT: Final = 443
CERT_PIN_PREFIX: Final = "sha256-raw:"
_MAX_REGION_ID: Final = 2**53 - 1
MAX_MAP_BYTES: Final = 4 << 20
"""A relay map larger than this is refused (real ones are a few tens of kilobytes)."""


class DERPMapError(ValueError):
    """A relay map that cannot be read or is invalid; the message says where and what."""

    def __init__(
        self, message: str, *, source: str, line: int | None = None, path: str | None = None
    ) -> None:
        self.source = source
        self.line = line
        self.path = path
        self.reason = message
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class DERPNode:
    """One relay server (``tailcfg.DERPNode``)."""

    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    """A literal IPv4 address, ``""`` (resolve ``host_name``) or ``"none"`` (no IPv4)."""
    ipv6: str = ""
    """A literal IPv6 address, ``""`` (resolve ``host_name``) or ``"none"`` (no IPv6)."""
    stun_port: int = 0
    """0 means 3478; -1 means no STUN on this node."""
    stun_only: bool = False
    derp_port: int = 0
    """0 means 443."""
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port80: bool = False

    @property
    def effective_stun_port(self) -> int | None:
        """The UDP port to send STUN to, or None when STUN is off for this node."""
        if self.stun_port < 0:
            return None
        return self.stun_port or DEFAULT_STUN_PORT

    @property
    def effective_derp_port(self) -> int:
        return self.derp_port or DEFAULT_DERP_PORT

    @property
    def cert_pin(self) -> str | None:
        """The hex SHA-256 of the leaf certificate a ``sha256-raw:<hex>`` CertName pins, else None.

        Self-signed relays are reached this way: the pin replaces the CA and host-name checks.
        """
        if not self.cert_name.startswith(CERT_PIN_PREFIX):
            return None
        return self.cert_name.removeprefix(CERT_PIN_PREFIX)

    @property
    def tls_server_name(self) -> str:
        """The name to send (SNI) and, unless pinned, to verify: ``CertName`` if set, else ``HostName``."""
        return self.cert_name if self.cert_name and self.cert_pin is None else self.host_name

    def tls_context(self) -> ssl.SSLContext:
        """A client context for this node: CA-verified, or unverified for ``InsecureForTests`` and
        for a pinned certificate (the caller then checks :attr:`cert_pin` itself)."""
        ctx = ssl.create_default_context()
        if self.insecure_for_tests or self.cert_pin is not None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def stun_address(self, family: Literal[4, 6]) -> str | None:
        """The literal address to STUN over ``family``, or None (no literal address, or disabled).

        ``STUNTestIP`` overrides both families when it is of the right family.
        """
        if self.stun_test_ip:
            ip = ipaddress.ip_address(self.stun_test_ip)
            return str(ip) if ip.version == family else None
        value = self.ipv4 if family == 4 else self.ipv6
        return value if value not in ("", "none") else None

    def dial_host(self) -> str:
        """Where to open TCP for DERP/HTTPS: a literal IPv4, else a literal IPv6, else the host name."""
        for value in (self.ipv4, self.ipv6):
            if value not in ("", "none"):
                return value
        return self.host_name


@dataclass(frozen=True, slots=True)
class DERPRegion:
    """A relay region (``tailcfg.DERPRegion``); ``nodes`` are in priority order."""

    region_id: int
    region_code: str = ""
    region_name: str = ""
    latitude: float = 0.0
    longitude: float = 0.0
    avoid: bool = False
    no_measure_no_home: bool = False
    nodes: tuple[DERPNode, ...] = ()


@dataclass(frozen=True, slots=True)
class DERPMap:
    """A whole relay map (``tailcfg.DERPMap``)."""

    regions: Mapping[int, DERPRegion] = field(default_factory=dict)
    region_score: Mapping[int, float] = field(default_factory=dict)
    """``HomeParams.RegionScore``: a latency multiplier per region (below 1 favours it as home)."""
    omit_default_regions: bool = False

    def region_ids(self) -> list[int]:
        """Region IDs in ascending order."""
        return sorted(self.regions)


# -- parsing ---------------------------------------------------------------------------------------


class _Reader:
    """Walks decoded JSON/YAML with a field path, looking up line numbers where known."""

    def __init__(self, source: str, lines: Mapping[tuple[object, ...], int]) -> None:
        self.source = source
        self.lines = lines

    def fail(self, path: tuple[object, ...], message: str) -> DERPMapError:
        line = None
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                break
        return DERPMapError(message, source=self.source, line=line, path=_format_path(path) or None)

    def obj(self, value: object, path: tuple[object, ...]) -> dict[str, tuple[object, object]]:
        """A mapping's entries by lower-cased key: ``{lower: (original key, value)}``."""
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {_describe(value)}")
        out: dict[str, tuple[object, object]] = {}
        for key, item in value.items():
            lower = str(key).lower()
            if lower in out:
                raise self.fail((*path, key), f"duplicate field (also spelled {out[lower][0]!r})")
            out[lower] = (key, item)
        return out

    def get(
        self, entries: Mapping[str, tuple[object, object]], name: str, path: tuple[object, ...]
    ) -> tuple[tuple[object, ...], object]:
        key, value = entries.get(name.lower(), (name, None))
        return (*path, key), value

    def int_(
        self,
        entries: Mapping[str, tuple[object, object]],
        name: str,
        path: tuple[object, ...],
        lo: int,
        hi: int,
        default: int = 0,
    ) -> int:
        p, value = self.get(entries, name, path)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise self.fail(p, f"must be an integer from {lo} to {hi}, got {_describe(value)}")
        if not lo <= int(value) <= hi:
            raise self.fail(p, f"must be an integer from {lo} to {hi}, got {int(value)}")
        return int(value)

    def float_(
        self, entries: Mapping[str, tuple[object, object]], name: str, path: tuple[object, ...]
    ) -> float:
        p, value = self.get(entries, name, path)
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(p, f"must be a number, got {_describe(value)}")
        return float(value)

    def bool_(
        self, entries: Mapping[str, tuple[object, object]], name: str, path: tuple[object, ...]
    ) -> bool:
        p, value = self.get(entries, name, path)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.fail(p, f"must be true or false, got {_describe(value)}")
        return value

    def str_(self, entries: Mapping[str, tuple[object, object]], name: str, path: tuple[object, ...]) -> str:
        p, value = self.get(entries, name, path)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(p, f"must be a string, got {_describe(value)}")
        return value

    def ip(
        self, entries: Mapping[str, tuple[object, object]], name: str, path: tuple[object, ...], version: int
    ) -> str:
        text = self.str_(entries, name, path)
        if text in ("", "none"):
            return text
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            ip = None
        if ip is None or (version and ip.version != version):
            kind = f"an IPv{version} address" if version else "an IP address"
            raise self.fail(self.get(entries, name, path)[0], f"must be {kind}, got {text!r}")
        return str(ip)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _format_path(path: tuple[object, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _region_key(key: object) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isdigit() and key.isascii():
        return int(key)
    return None


def _parse_node(r: _Reader, value: object, path: tuple[object, ...], region_id: int) -> DERPNode:
    e = r.obj(value, path)
    name = r.str_(e, "Name", path)
    if not name:
        raise r.fail(r.get(e, "Name", path)[0], "a node needs a non-empty Name")
    host_name = r.str_(e, "HostName", path)
    if not host_name:
        raise r.fail(r.get(e, "HostName", path)[0], "a node needs a non-empty HostName")
    node_region = r.int_(e, "RegionID", path, 0, _MAX_REGION_ID, default=region_id)
    if node_region != region_id:
        raise r.fail(r.get(e, "RegionID", path)[0], f"is {node_region} inside region {region_id}")
    stun_test_ip = r.ip(e, "STUNTestIP", path, 0)
    if stun_test_ip == "none":
        raise r.fail(r.get(e, "STUNTestIP", path)[0], "must be an IP address, got 'none'")
    return DERPNode(
        name=name,
        region_id=region_id,
        host_name=host_name,
        cert_name=r.str_(e, "CertName", path),
        ipv4=r.ip(e, "IPv4", path, 4),
        ipv6=r.ip(e, "IPv6", path, 6),
        stun_port=r.int_(e, "STUNPort", path, -1, 65535),
        stun_only=r.bool_(e, "STUNOnly", path),
        derp_port=r.int_(e, "DERPPort", path, 0, 65535),
        insecure_for_tests=r.bool_(e, "InsecureForTests", path),
        stun_test_ip=stun_test_ip,
        can_port80=r.bool_(e, "CanPort80", path),
    )


def _parse_region(r: _Reader, value: object, path: tuple[object, ...], key_id: int) -> DERPRegion:
    e = r.obj(value, path)
    region_id = r.int_(e, "RegionID", path, 1, _MAX_REGION_ID, default=key_id)
    if region_id != key_id:
        raise r.fail(r.get(e, "RegionID", path)[0], f"is {region_id} but the region's key is {key_id}")
    nodes_path, nodes_value = r.get(e, "Nodes", path)
    if nodes_value is None:
        nodes_value = []
    if not isinstance(nodes_value, list):
        raise r.fail(nodes_path, f"must be a list of nodes, got {_describe(nodes_value)}")
    nodes = tuple(_parse_node(r, n, (*nodes_path, i), region_id) for i, n in enumerate(nodes_value))
    return DERPRegion(
        region_id=region_id,
        region_code=r.str_(e, "RegionCode", path),
        region_name=r.str_(e, "RegionName", path),
        latitude=r.float_(e, "Latitude", path),
        longitude=r.float_(e, "Longitude", path),
        avoid=r.bool_(e, "Avoid", path),
        no_measure_no_home=r.bool_(e, "NoMeasureNoHome", path),
        nodes=nodes,
    )


def _build(r: _Reader, data: object) -> DERPMap:
    top = r.obj(data, ())
    if "regions" not in top and "derpmap" in top:  # a policy file's {"derpMap": {...}} wrapper
        key, inner = top["derpmap"]
        return _build(_Reader(r.source, {k[1:]: v for k, v in r.lines.items() if k[:1] == (key,)}), inner)
    regions_path, regions_value = r.get(top, "Regions", ())
    if regions_value is None:
        raise r.fail(regions_path, "the map has no Regions")
    regions_entries = r.obj(regions_value, regions_path)
    regions: dict[int, DERPRegion] = {}
    names: dict[str, int] = {}
    for key, value in regions_entries.values():
        region_id = _region_key(key)
        path = (*regions_path, key)
        if region_id is None or not 1 <= region_id <= _MAX_REGION_ID:
            raise r.fail(path, f"region keys are region IDs (1 to 2^53-1), got {key!r}")
        if region_id in regions:
            raise r.fail(path, f"region {region_id} appears twice")
        region = _parse_region(r, value, path, region_id)
        for node in region.nodes:
            if node.name in names:
                raise r.fail(path, f"node name {node.name!r} is also used in region {names[node.name]}")
            names[node.name] = region_id
        regions[region_id] = region
    scores: dict[int, float] = {}
    home_path, home_value = r.get(top, "HomeParams", ())
    if home_value is not None:
        home = r.obj(home_value, home_path)
        score_path, score_value = r.get(home, "RegionScore", home_path)
        if score_value is not None:
            for key, value in r.obj(score_value, score_path).values():
                region_id = _region_key(key)
                path = (*score_path, key)
                if region_id is None:
                    raise r.fail(path, f"keys are region IDs, got {key!r}")
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                    raise r.fail(path, f"must be a positive number, got {_describe(value)}")
                scores[region_id] = float(value)
    return DERPMap(
        regions=regions, region_score=scores, omit_default_regions=r.bool_(top, "omitDefaultRegions", ())
    )


def _yaml_module(source: str) -> Any:
    # Imported lazily and untyped: only YAML maps need PyYAML, and it ships no type stubs.
    try:
        return importlib.import_module("yaml")
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise DERPMapError("reading YAML relay maps needs PyYAML (pip install pyyaml)", source=source)


def _yaml_lines(
    node: Any, path: tuple[object, ...], loader: Any, out: dict[tuple[object, ...], int], seen: set[int]
) -> None:
    yaml = _yaml_module("")
    out[path] = node.start_mark.line + 1
    if id(node) in seen:  # an alias: walking it again could take exponential time ("billion laughs")
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = loader.construct_object(key_node)
                if isinstance(key, str | int) and not isinstance(key, bool):
                    out[(*path, key)] = key_node.start_mark.line + 1
                    _yaml_lines(value_node, (*path, key), loader, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _yaml_lines(item, (*path, i), loader, out, seen)


def _load_yaml(text: str, source: str) -> tuple[object, dict[tuple[object, ...], int]]:
    yaml = _yaml_module(source)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks for unprintable characters already
        root = loader.get_single_node()
        if root is None:
            raise DERPMapError("the file is empty", source=source)
        lines: dict[tuple[object, ...], int] = {}
        _yaml_lines(root, (), loader, lines, set())
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise DERPMapError(f"invalid YAML: {e.problem or e.context}", source=source, line=line)
    except yaml.YAMLError as e:
        raise DERPMapError(f"invalid YAML: {e}", source=source)
    except RecursionError:
        raise DERPMapError("invalid YAML: nested too deeply", source=source)
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def parse_derp_map(
    text: str | bytes, *, source: str = "<derp map>", format: Literal["json", "yaml"] | None = None
) -> DERPMap:
    """Parse a relay map from ``text``; ``source`` names it in errors.

    ``format`` None guesses: text starting with ``{`` is JSON, anything else YAML. Raises
    :class:`DERPMapError` for malformed or invalid input (never another exception type).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DERPMapError(f"not UTF-8 text (byte {e.start})", source=source)
    if format is None:
        format = "json" if text.lstrip().startswith("{") else "yaml"
    lines: dict[tuple[object, ...], int] = {}
    if format == "json":
        try:
            data: object = json.loads(text)
        except json.JSONDecodeError as e:
            raise DERPMapError(f"invalid JSON: {e.msg} (column {e.colno})", source=source, line=e.lineno)
        except RecursionError:
            raise DERPMapError("invalid JSON: nested too deeply", source=source)
    else:
        data, lines = _load_yaml(text, source)
    try:
        return _build(_Reader(source, lines), data)
    except RecursionError:  # pragma: no cover - _build does not recurse into user data
        raise DERPMapError("nested too deeply", source=source)


def load_derp_map(path: str | Path, *, format: Literal["json", "yaml"] | None = None) -> DERPMap:
    """Read and parse the relay map in file ``path``.

    ``format`` None: ``*.json`` is JSON, ``*.yaml``/``*.yml`` YAML, anything else is guessed from
    the content. Raises :class:`DERPMapError` (naming the file) when it cannot be read or is invalid.
    """
    p = Path(path)
    source = str(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_MAP_BYTES + 1)
    except OSError as e:
        raise DERPMapError(f"cannot read: {e.strerror or e}", source=source)
    if len(data) > MAX_MAP_BYTES:
        raise DERPMapError(f"larger than {MAX_MAP_BYTES} bytes", source=source)
    if format is None:
        suffix = p.suffix.lower()
        format = "json" if suffix == ".json" else "yaml" if suffix in (".yaml", ".yml") else None
    return parse_derp_map(data, source=source, format=format)
