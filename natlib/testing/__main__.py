"""``python -m natlib.testing``: bring a NAT lab up for people to poke at, and tear it down.

python -m natlib.testing up easy,hard          # prints hosts, addresses and how to get a shell
python -m natlib.testing up 'a=easyPMP:hosts=2,b=v6only' --no-stun
python -m natlib.testing list
python -m natlib.testing down 3f9a1c           # or just "down" when a single lab is up
python -m natlib.testing down --all-stale      # leftovers of crashed runs (owner process gone)
python -m natlib.testing down --all            # every natlab-* namespace on this machine
python -m natlib.testing kinds                 # the NAT kinds
"""

from __future__ import annotations

import argparse
import logging
import sys

from ._lab import Lab, LabError, down_all, down_lab, list_labs, missing_tools
from ._measure import start_stun_server
from ._spec import NAT_KINDS, Topology, TopologyError


def _up(args: argparse.Namespace) -> int:
    missing = missing_tools()
    if missing:
        print(f"cannot build a lab here: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        topology = Topology.parse(args.spec)
    except (TopologyError, ValueError, TypeError) as e:
        print(f"bad topology: {e}", file=sys.stderr)
        return 2
    lab = Lab(topology, lab_id=args.id, detached=True)
    lab.up()
    try:
        stun = start_stun_server(lab) if args.stun and topology.servers else None
    except BaseException:
        lab.down()
        raise
    print(lab.describe())
    if stun is not None:
        eps = [stun.endpoint_str(4)] if stun.ipv4 else []
        eps += [stun.endpoint_str(6)] if stun.ipv6 else []
        print(
            f"STUN server (UDP+TCP, ports {', '.join(map(str, stun.ports))}) on {stun.host}: {' '.join(eps)}"
        )
    first = next(iter(h for h in lab.hosts.values() if h.role in ("lan", "public")), None)
    if first is not None:
        print(f"shell in a host:  ip netns exec {first.netns} bash")
    print(f"tear down:        {sys.executable} -m natlib.testing down {lab.id}")
    return 0


def _down(args: argparse.Namespace) -> int:
    if args.all or args.all_stale:
        removed = down_all(stale_only=not args.all)
        print(f"removed {len(removed)} lab(s){': ' + ' '.join(removed) if removed else ''}")
        return 0
    lab_id = args.id
    if lab_id is None:
        labs = list_labs()
        if len(labs) != 1:
            print(f"{len(labs)} labs recorded; name one (see 'list')", file=sys.stderr)
            return 2
        lab_id = str(labs[0]["id"])
    if not down_lab(lab_id):
        print(f"no lab {lab_id}", file=sys.stderr)
        return 1
    print(f"lab {lab_id} down")
    return 0


def _list(args: argparse.Namespace) -> int:
    labs = list_labs()
    if not labs:
        print("no labs")
    for st in labs:
        state = "detached" if st.get("detached") else ("running" if st["alive"] else "STALE")
        sites = ", ".join(f"{s['name']}={s['nat']}" for s in st["topology"]["sites"])
        n_ns = len(st.get("namespaces", []))
        print(f"{st['id']}  {state:<8} owner pid {st.get('owner_pid')}  {n_ns} namespaces  sites: {sites}")
    return 0


def _kinds(args: argparse.Namespace) -> int:
    for k in NAT_KINDS.values():
        print(
            f"{k.name:<12} mapping={k.mapping or '-':<21} filtering={k.filtering or '-':<27} {k.description}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m natlib.testing", description="natlib's NAT lab")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("up", help="build a lab and leave it running")
    a.add_argument("spec", help="e.g. 'easy,hard' or 'a=easyPMP:hosts=2,b=v6only' or JSON")
    a.add_argument("--id", help="lab id (default: random)")
    a.add_argument("--no-stun", dest="stun", action="store_false", help="do not start the STUN server")
    a.set_defaults(func=_up)
    a = sub.add_parser("down", help="tear a lab down")
    a.add_argument("id", nargs="?")
    a.add_argument("--all-stale", action="store_true", help="labs whose owner died, and orphan namespaces")
    a.add_argument("--all", action="store_true", help="every lab on this machine")
    a.set_defaults(func=_down)
    sub.add_parser("list", help="recorded labs").set_defaults(func=_list)
    sub.add_parser("kinds", help="the NAT kinds").set_defaults(func=_kinds)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        rc: int = args.func(args)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
