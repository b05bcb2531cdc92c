"""``meshnode``: the mesh client's command line.

Subcommands (only those that work today are registered):

``meshnode genkey -o node.key [--force] [--name NAME] [--overlay-v4 ADDR] [--overlay-v6 ADDR]``
    Write a new key file (mode 0600; an existing file is kept unless ``--force``), print the public
    keys and the ``[[node]]`` snippet to paste into the mesh file.
``meshnode check -c mesh.toml -k node.key``
    Validate both files together (the key file's node must be in the mesh, with the same disco key)
    and print a summary of the mesh as this node sees it.
``meshnode up -c mesh.toml -k node.key [--ifname NAME] [--control PATH] [--port N] [-v]``
    Run the node in the foreground (:mod:`client.daemon`) until SIGINT/SIGTERM; prints one
    ``meshnode up: ...`` line once the mesh is up. Needs root (wireguard-go, ``ip``).
``meshnode status [--json] [--control PATH | -c mesh.toml]``
    The path table of the running node: peer, overlay IP, path (direct + address, relay + region,
    offline), RTT, last handshake, rx/tx. ``--json``: the daemon's status document.
``meshnode ping PEER [--count N] [--timeout S] [--no-stop-direct] [--json]``
    Disco pings like ``tailscale ping``: one line per pong with its path and RTT; stops at the
    first direct pong (unless ``--no-stop-direct``) or after N pings. Exit 0 if a pong came back.
``meshnode netcheck -c mesh.toml [--json]``
    natlib's netcheck against the mesh file's relays.
``meshnode demo``
    Root only: a relay and three nodes behind easy, hard and UDP-blocking NATs in a throwaway lab;
    pings every pair over the overlay, prints the path tables, tears it all down (:mod:`client._demo`).

The control socket is ``/run/meshnode/<mesh>.sock`` unless ``--control`` says otherwise; ``status``
and ``ping`` find it from ``-c mesh.toml``, or take the only one in ``/run/meshnode``.

Exit status: 0 on success; 2 for a bad command line, a bad mesh file or a bad key file, with a
one-line message naming the file, the line and the field (``mesh.toml:14: node[1].overlay_v4: ...``);
1 for other failures (engine, control socket, no pong), 130 when interrupted before ``up`` is up.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from ._control import DEFAULT_CONTROL_DIR, ControlError, Event, control_call, default_control_path
from ._errors import FileFieldError
from ._status import format_ping_event, format_status_table
from .daemon import DaemonOptions, run_daemon
from .engine import EngineError
from .keyfile import KeyFileError, NodeKeys, read_key_file, write_key_file
from .meshfile import OVERLAY_V4_RANGE, OVERLAY_V6_RANGE, MeshFileError, load_mesh_file
from .wgconfig import find_self

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_INTERRUPTED", "main", "node_snippet"]

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
PROG = "meshnode"


class _UsageError(Exception):
    """A bad command-line value: printed as ``meshnode SUBCOMMAND: OPTION: PROBLEM``, exit 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own format, but one line and our exit code.
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}\n")


def _default_name() -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")[:63]
    return label.strip("-") or "node"


def _overlay_v4(text: str) -> ipaddress.IPv4Address:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise _UsageError(f"--overlay-v4: {text!r} is not an IPv4 address") from None
    if address not in OVERLAY_V4_RANGE or address in (OVERLAY_V4_RANGE[0], OVERLAY_V4_RANGE[-1]):
        raise _UsageError(f"--overlay-v4: {address} is not a host address in {OVERLAY_V4_RANGE}")
    return address


def _overlay_v6(text: str) -> ipaddress.IPv6Address:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise _UsageError(f"--overlay-v6: {text!r} is not an IPv6 address") from None
    if address not in OVERLAY_V6_RANGE:
        raise _UsageError(f"--overlay-v6: {address} is not in the unique local range {OVERLAY_V6_RANGE}")
    return address


def node_snippet(
    keys: NodeKeys,
    name: str,
    overlay_v4: ipaddress.IPv4Address | None = None,
    overlay_v6: ipaddress.IPv6Address | None = None,
) -> str:
    """The ``[[node]]`` table for the mesh file. Fields still to choose are commented out."""
    lines = [
        "[[node]]",
        f'name = "{name}"',
        f'node_key = "{keys.node_key.public.text()}"',
        f'disco_key = "{keys.disco_key.public.text()}"',
    ]
    if overlay_v4 is not None:
        lines.append(f'overlay_v4 = "{overlay_v4}"')
    else:
        lines.append(f'# overlay_v4 = "100.64.X.Y"   # required: a free address in {OVERLAY_V4_RANGE}')
    if overlay_v6 is not None:
        lines.append(f'overlay_v6 = "{overlay_v6}"')
    else:
        lines.append(f'# overlay_v6 = "fd7a:115c:a1e0::X"   # optional, in {OVERLAY_V6_RANGE}')
    lines.append('# endpoints = ["198.51.100.7:41641"]   # optional static endpoints')
    return "\n".join(lines) + "\n"


def _genkey(args: argparse.Namespace) -> int:
    name = args.name if args.name is not None else _default_name()
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", name):
        raise _UsageError(f"--name: {name!r} must be a DNS label (a-z, 0-9, '-', at most 63)")
    v4 = _overlay_v4(args.overlay_v4) if args.overlay_v4 is not None else None
    v6 = _overlay_v6(args.overlay_v6) if args.overlay_v6 is not None else None
    keys = NodeKeys.generate()
    write_key_file(args.output, keys, overwrite=args.force)
    print(f"wrote {args.output} (mode 0600): keep it on this node only")
    print(f"node key:  {keys.node_key.public.text()}")
    print(f"disco key: {keys.disco_key.public.text()}")
    print()
    print("# add this node to the mesh file shared by all nodes:")
    print(node_snippet(keys, name, v4, v6), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    mesh = load_mesh_file(args.config)
    keys = read_key_file(args.key)
    me = find_self(mesh, keys, args.key)
    regions = ", ".join(f"{r.region_id} {r.code} ({len(r.nodes)} relays)" for r in mesh.relay_map.regions)
    source = f" from {mesh.relay_map.source}" if mesh.relay_map.source else ""
    print(f"{mesh.path}: mesh {mesh.name!r}, {len(mesh.nodes)} nodes; relay regions{source}: {regions}")
    print(f"{args.key}: this node is {me.name!r} ({me.node_key.short()})")
    print(f"  overlay   {'  '.join(str(a) for a in me.overlay_addresses)}")
    peers = mesh.peers_of(me.node_key)
    print(f"peers ({len(peers)}):")
    for peer in peers:
        extra = ""
        if peer.endpoints:
            extra += "  endpoints " + ",".join(str(e) for e in peer.endpoints)
        if peer.subnet_routes:
            extra += "  routes " + ",".join(str(r) for r in peer.subnet_routes)
        addresses = " ".join(str(a) for a in peer.overlay_addresses)
        print(f"  {peer.name:<16} {peer.node_key.short()}  {addresses}{extra}")
    print("ok")
    return 0


def _ready_line(status: Mapping[str, Any]) -> str:
    me = status["node"]
    return (
        f"meshnode up: mesh {status['mesh']!r} as {me['name']} ({', '.join(me['overlay'])}) "
        f"on {me['ifname']}, {len(status['peers'])} peers, control {status['control']}"
    )


def _up(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not 0 <= args.port <= 0xFFFF:
        raise _UsageError(f"--port: {args.port} is not in 0-65535")
    options = DaemonOptions(
        args.config, args.key, ifname=args.ifname, control_path=args.control, port=args.port
    )

    def ready(status: Mapping[str, Any]) -> None:
        print(_ready_line(status), flush=True)

    trio.run(lambda: run_daemon(options, on_ready=ready))
    print("meshnode up: stopped", flush=True)
    return 0


def _control_path(args: argparse.Namespace) -> Path:
    if args.control is not None:
        return Path(args.control)
    if args.config is not None:
        from .meshfile import load_mesh_file

        return default_control_path(load_mesh_file(args.config).name)
    sockets = sorted(DEFAULT_CONTROL_DIR.glob("*.sock")) if DEFAULT_CONTROL_DIR.is_dir() else []
    if len(sockets) == 1:
        return sockets[0]
    if not sockets:
        raise ControlError(f"no meshnode running (no control socket in {DEFAULT_CONTROL_DIR})")
    names = ", ".join(p.stem for p in sockets)
    raise _UsageError(f"several meshes are up ({names}): choose one with -c MESH.toml or --control PATH")


async def _call(path: Path, method: str, params: Mapping[str, Any], on_event: Any) -> Mapping[str, Any]:
    async with contextlib.aclosing(control_call(path, method, params)) as replies:
        async for reply in replies:
            if isinstance(reply, Event):
                on_event(reply.data)
            else:
                return reply.data
    raise ControlError(f"{path}: no result")


def _status(args: argparse.Namespace) -> int:
    path = _control_path(args)
    status = trio.run(_call, path, "status", {}, None)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status_table(status), end="")
    return 0


def _ping(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 1000:
        raise _UsageError(f"--count: {args.count} is not in 1-1000")
    if not 0 < args.timeout <= 60:
        raise _UsageError(f"--timeout: {args.timeout} is not in (0, 60] seconds")
    path = _control_path(args)
    params = {
        "peer": args.peer,
        "count": args.count,
        "timeout": args.timeout,
        "until_direct": args.stop_direct,
    }

    def on_event(event: Mapping[str, Any]) -> None:
        print(json.dumps(event) if args.json else format_ping_event(event), flush=True)

    result = trio.run(_call, path, "ping", params, on_event)
    if args.json:
        print(json.dumps({"result": result}))
    elif result["pongs"] and not result["direct"] and args.stop_direct:
        print(f"direct connection not established with {result['peer']} after {result['sent']} pings")
    return 0 if result["pongs"] else EXIT_FAILURE


def _netcheck(args: argparse.Namespace) -> int:
    from natlib.netcheck import netcheck

    from .daemon import relay_derp_map
    from .meshfile import load_mesh_file

    mesh = load_mesh_file(args.config)
    derp_map = relay_derp_map(mesh.relay_map)
    report = trio.run(lambda: netcheck(derp_map))
    print(report.to_json() if args.json else report.format_text(derp_map))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo()


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="A thin WireGuard mesh client on natlib.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    genkey = sub.add_parser("genkey", help="write a new node key file and print its [[node]] snippet")
    genkey.add_argument("-o", "--output", required=True, type=Path, help="the key file to write (mode 0600)")
    genkey.add_argument("--force", action="store_true", help="overwrite an existing key file")
    genkey.add_argument("--name", help="the node's name in the snippet (default: this host's name)")
    genkey.add_argument(
        "--overlay-v4", metavar="ADDR", help=f"the node's overlay IPv4 address ({OVERLAY_V4_RANGE})"
    )
    genkey.add_argument(
        "--overlay-v6", metavar="ADDR", help=f"the node's overlay IPv6 address ({OVERLAY_V6_RANGE})"
    )
    genkey.set_defaults(run=_genkey)
    check = sub.add_parser("check", help="validate a mesh file and this node's key file together")
    check.add_argument("-c", "--config", required=True, type=Path, help="the mesh file (TOML)")
    check.add_argument("-k", "--key", required=True, type=Path, help="this node's key file")
    check.set_defaults(run=_check)

    up = sub.add_parser("up", help="run this node of the mesh in the foreground (root)")
    up.add_argument("-c", "--config", required=True, type=Path, help="the mesh file (TOML)")
    up.add_argument("-k", "--key", required=True, type=Path, help="this node's key file")
    up.add_argument("--ifname", help="the WireGuard interface (default: mn-<mesh name>)")
    up.add_argument("--control", type=Path, help="the control socket (default: /run/meshnode/<mesh>.sock)")
    up.add_argument("--port", type=int, default=0, help="natlib's UDP port (default: any)")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    up.set_defaults(run=_up)

    def control_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, help="the mesh file: its name picks the control socket")
        p.add_argument("--control", type=Path, help="the control socket of the running node")
        p.add_argument("--json", action="store_true", help="JSON output")

    status = sub.add_parser("status", help="the running node's peers, paths, RTTs and counters")
    control_options(status)
    status.set_defaults(run=_status)
    ping = sub.add_parser("ping", help="disco-ping a peer through the running node")
    ping.add_argument("peer", metavar="PEER", help="a peer's name, overlay address or node key")
    ping.add_argument("--count", type=int, default=10, help="at most this many pings (default 10)")
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each pong (default 5)")
    ping.add_argument(
        "--no-stop-direct",
        dest="stop_direct",
        action="store_false",
        help="keep pinging after the first direct pong",
    )
    control_options(ping)
    ping.set_defaults(run=_ping)
    netcheck = sub.add_parser("netcheck", help="check the network against the mesh file's relays")
    netcheck.add_argument("-c", "--config", required=True, type=Path, help="the mesh file (TOML)")
    netcheck.add_argument("--json", action="store_true", help="the report as JSON")
    netcheck.set_defaults(run=_netcheck)
    demo = sub.add_parser("demo", help="a 3-node mesh with a relay in a throwaway NAT lab (root)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``meshnode`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        status: int = _unwrap_groups(args.run, args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (EngineError, ControlError) as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except (MeshFileError, KeyFileError, FileFieldError) as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _UsageError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return status


def _unwrap_groups(run: Any, args: argparse.Namespace) -> int:
    """Run a subcommand; a task group's single exception is raised as itself (for the message)."""
    try:
        status: int = run(args)
    except BaseExceptionGroup as group:
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None
    return status
