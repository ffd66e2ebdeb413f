"""``pep lab ...``: the subcommands. Exit codes as for ``pep``: 0 ok, 1 failure, 2 bad usage.

Kept light to import (no trio, pyroute2 or matplotlib at module level): ``pep --help`` builds
this parser every time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pep.lab.star import add_options as add_star_options
from pep.support.errors import describe

__all__ = ["add_parser", "checked_prefix", "main"]

DEFAULT_PREFIX = "peplab"  # `pep lab up/down/status/exec/split`
DEMO_PREFIX = "pepdemo"  # demo and bench build (and remove) their own lab
BENCH_PREFIX = "pepbench"
NODES = ("client", "pepa", "link", "pepb", "server")
# The workloads of `pep lab bench` (pep.lab.workloads.WORKLOADS; named here to keep this
# module light to import).
WORKLOADS = (
    "single", "parallel", "upload", "page", "interactive", "loss", "https", "idle", "fade",
    "fade300", "handover",
)  # fmt: skip
DEFAULT_WORKLOADS = ("single", "parallel", "upload", "page", "interactive", "loss", "https")


def _link_options(p: argparse.ArgumentParser, default_profile: str) -> None:
    g = p.add_argument_group("link")
    g.add_argument(
        "--profile",
        default=default_profile,
        help=f"geo (600 ms, 20/5 Mbit/s), meo (150 ms, 50/20), leo (40 ms, 100/20), lan "
        f"(no impairment); default {default_profile}",
    )
    g.add_argument("--rtt", metavar="MS", help="round-trip time, e.g. 600 or 600ms or 0.6s")
    g.add_argument("--down", metavar="RATE", help="downlink rate, e.g. 20 (Mbit/s) or 512kbit")
    g.add_argument("--up", metavar="RATE", help="uplink rate; 0 = unlimited")
    g.add_argument("--loss", metavar="PCT", help="random loss per direction, percent (0.5)")
    g.add_argument(
        "--queue", metavar="MS", help="bottleneck (tbf) queue in ms at the link rate (one RTT)"
    )
    g.add_argument(
        "--handover",
        metavar="PERIOD/OUTAGE",
        help="LEO handovers: every PERIOD the link delivers nothing for OUTAGE, e.g. 15s/100ms",
    )
    g.add_argument(
        "--topology",
        choices=("symmetric", "one-ended", "ha", "ecmp", "star"),
        default="symmetric",
        help="client-pepa-link-pepb-server, or client-pepa-link-server (default symmetric); "
        "ha: two gateways with VRRP (keepalived), ecmp: a router spreading flows over two; "
        "star: a hub pep serving --terminals N terminals, each with its plan",
    )
    g.add_argument(
        "--no-peer",
        action="store_true",
        help="symmetric topology: the PEPs without pre-connected legs ([peer]), which they "
        "keep by default",
    )
    add_star_options(p)


def _prefix(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--prefix",
        default=default,
        type=checked_prefix,
        help=f"namespace name prefix: nodes are PREFIX-client ... (default {default})",
    )


def checked_prefix(text: str) -> str:
    """Every subcommand refuses what ``pep lab down`` refuses (pep.lab.plan.check_prefix): a
    prefix that could name another lab's namespaces, or a path."""
    from pep.lab.plan import LabError, check_prefix

    try:
        check_prefix(text)
    except LabError as e:
        raise argparse.ArgumentTypeError(describe(e)) from None
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``pep lab`` on the ``pep`` command's subparsers."""
    lab = sub.add_parser(
        "lab",
        help="emulated satellite link in network namespaces: demo and benchmark",
        description="An emulated satellite link (delay, rate, loss) in network namespaces, "
        "with pep on the PEP nodes. Needs root.",
    )
    s = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    p = s.add_parser("up", help="build a lab and start its processes")
    _link_options(p, "geo")
    p.add_argument("--no-pep", action="store_true", help="same topology, plain routing")
    _prefix(p, DEFAULT_PREFIX)

    p = s.add_parser("down", help="remove a lab: namespaces, processes, state (also after a crash)")
    _prefix(p, DEFAULT_PREFIX)

    p = s.add_parser("status", help="nodes, link parameters, processes")
    _prefix(p, DEFAULT_PREFIX)

    from pep.lab.exec_node import EXEC_USAGE

    p = s.add_parser("exec", help=f"run a command in a node: {EXEC_USAGE}", usage=EXEC_USAGE)
    p.add_argument(
        "node", help=f"a node of the lab: {', '.join(NODES)} (star: hub, link, server, t1, c1, ...)"
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    _prefix(p, DEFAULT_PREFIX)

    p = s.add_parser(
        "fade",
        help="the link delivers nothing, both ways, for SECONDS, then comes back",
        description="Fade the running lab's link (a rain fade, a lost satellite): every packet "
        "entering or leaving the link is dropped for SECONDS. Waits until the link is back; "
        "interrupted (Ctrl-C), it ends the fade at once.",
    )
    p.add_argument("seconds", type=float, help="how long, in seconds (e.g. 20, 0.5)")
    p.add_argument("--no-wait", action="store_true", help="start the fade and return at once")
    _prefix(p, DEFAULT_PREFIX)

    p = s.add_parser(
        "split",
        help="start (on) or stop (off) pep on the PEP nodes; direct: pep without the "
        "pre-connected legs",
    )
    p.add_argument("state", choices=("on", "off", "direct"))
    _prefix(p, DEFAULT_PREFIX)

    for name, prefix, sizes, text in (
        (
            "demo",
            DEMO_PREFIX,
            "100k,1M,10M",
            "one-command demo: GEO lab, single fetches and 6 parallel downloads, with and "
            "without PEP",
        ),
        (
            "bench",
            BENCH_PREFIX,
            "100k,1M,10M",
            "with/without-PEP benchmark of a terminal's workloads: tables, JSON and PNG",
        ),
    ):
        p = s.add_parser(name, help=text, description=text)
        _link_options(p, "geo")
        p.add_argument("--sizes", default=sizes, help=f"single-fetch sizes (default {sizes})")
        p.add_argument(
            "--out",
            type=Path,
            default=Path(f"lab-{name}.png"),
            help=f"PNG chart path (lab-{name}.png)",
        )
        p.add_argument(
            "--timeout", type=float, default=300.0, help="seconds allowed per workload (300)"
        )
        if name == "bench":
            p.add_argument(
                "--workloads",
                default=None,
                help="comma-separated, of: single (one fetch per size), parallel (1, 3, 6, 20 "
                "x 1 MB at once), upload (6 x 1 MB at once), page (HTML + 40 objects over 6 "
                "keep-alive connections), interactive (10 x 10 KB idle and during a 50 MB "
                "download), loss (10 MB at 0.5 %% loss, its own lab), https (TLS 1.3, 100 KB and 1 "
                "MB), idle (1 MB after 2 idle minutes); default all but idle. --topology star: "
                "neighbours (t1 6 x 1 MB while t2 fetches 2 MB), oversubscribed (4 terminals x "
                "3 x 5 MB), planchange (t1's plan halved during 20 MB); default all three",
            )
            p.add_argument(
                "--reps",
                type=int,
                help="repetitions (median; default 3; with --topology ha: failovers, default 5)",
            )
            p.add_argument(
                "--compare-direct",
                action="store_true",
                help="also measure pep without its pre-connected legs (the demo always does)",
            )
            p.add_argument(
                "--failover",
                choices=("pep", "box", "link"),
                default="pep",
                help="--topology ha: what fails on the master: its pep killed (default), the "
                "whole box (every process killed, links down), or its client-side link down",
            )
            p.add_argument("--json", type=Path, help="write all measurements here")
        _prefix(p, prefix)


def _profile(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pep.lab import profiles

    prof = profiles.profile(args.profile)
    return prof.with_overrides(
        rtt_ms=None if args.rtt is None else profiles.parse_rtt(args.rtt),
        down_bps=None if args.down is None else profiles.parse_rate(args.down),
        up_bps=None if args.up is None else profiles.parse_rate(args.up),
        loss=None if args.loss is None else profiles.parse_loss(args.loss),
        queue_ms=None if args.queue is None else profiles.parse_rtt(args.queue),
        handover=None if args.handover is None else profiles.parse_handover(args.handover),
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pep.lab.plan import LabError
    from pep.lab.profiles import ParseError

    try:
        return _dispatch(args)
    except (LabError, ParseError) as e:
        print(f"pep lab: {describe(e)}", file=sys.stderr)
        return 2 if isinstance(e, ParseError) else 1
    except KeyboardInterrupt:
        print("pep lab: interrupted", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from pep.lab.build import check_environment, down, up
    from pep.lab.plan import LabSpec
    from pep.lab.star import spec_fields
    from pep.lab.state import Lab, not_up
    from pep.lab.status import status_text

    cmd = args.lab_command
    if cmd == "status":
        print(status_text(args.prefix))
        return 0
    if cmd in ("up", "demo", "bench"):
        prof = _profile(args)  # parse errors before anything else
        star = spec_fields(args, prof, 2 if cmd == "up" else 4)  # --topology star's
    if cmd == "exec":
        from pep.lab.exec_node import exec_args

        prefix, argv = exec_args(args.cmd, args.prefix, DEFAULT_PREFIX)  # the same
    check_environment()
    if cmd == "up":
        spec = LabSpec(
            prof, args.topology, not args.no_pep, args.prefix, peer=not args.no_peer,
            **star,  # type: ignore[arg-type]
        )  # fmt: skip
        up(spec, lambda msg: print(msg, file=sys.stderr, flush=True))
        print(status_text(args.prefix))
        return 0
    if cmd == "down":
        removed = down(args.prefix)
        if removed:
            print(f"removed lab {args.prefix!r}: {', '.join(removed)}")
        else:
            print(f"no lab with prefix {args.prefix!r}; nothing to remove")
        return 0
    if cmd == "exec":
        from pep.lab.exec_node import exec_in

        return exec_in(prefix, args.node.lower(), argv)
    if cmd == "fade":
        from pep.lab.fade import fade

        return fade(args.prefix, args.seconds, wait=not args.no_wait)
    if cmd == "split":
        from pep.lab.cluster import refuse_split

        lab = Lab.load(args.prefix)
        if lab is None:
            raise not_up(args.prefix)
        refuse_split(lab)
        lab.set_split(args.state != "off", direct=args.state == "direct")
        print(f"pep {args.state} on {', '.join(lab.pep_nodes)}")
        return 0
    return _bench(args, prof)


def _bench(args: argparse.Namespace, prof) -> int:  # type: ignore[no-untyped-def]
    from pep.lab import bench, profiles, report
    from pep.lab.plan import LabSpec

    reps = getattr(args, "reps", None)
    if reps is not None and reps < 1:
        raise profiles.ParseError(f"--reps {reps}: must be at least 1")
    if args.topology in ("ha", "ecmp"):
        return _cluster_bench(args, prof)
    if args.topology == "star":
        from pep.lab import star_report

        return star_report.command(args, prof, reps or 3)
    reps = reps or (1 if args.lab_command == "demo" else 3)
    sizes = profiles.parse_sizes(args.sizes)
    if args.lab_command == "demo":
        chosen = bench.selected(["single", "parallel"], sizes, parallel=(6,))
    else:
        names = [n.strip() for n in (args.workloads or ",".join(DEFAULT_WORKLOADS)).split(",")]
        names = [n for n in names if n]
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown or not names:
            raise profiles.ParseError(
                f"--workloads {args.workloads!r}: choose from {', '.join(WORKLOADS)}"
            )
        chosen = bench.selected(names, sizes)
    spec = LabSpec(prof, args.topology, True, args.prefix, peer=not args.no_peer)
    peered = spec.peer and spec.topology == "symmetric"
    # The demo shows what the pre-connected legs add; bench does when asked.
    compare = peered and (args.lab_command == "demo" or getattr(args, "compare_direct", False))
    modes = bench.ALL_MODES if compare else bench.MODES
    progress = bench.Progress()
    result = bench.run(spec, chosen, reps, args.timeout, progress, modes)
    print(f"{prof.describe()}, {args.topology}" + (f", median of {reps}" if reps > 1 else ""))
    rows = result.rows()
    if rows:
        print(report.format_table(rows))
    others = [s for s in result.summaries() if s.workload != "single"]
    if others:
        print()
        print(report.format_summary(others))
    report.chart(result, args.out)
    print(f"chart: {args.out}")
    if getattr(args, "json", None):
        report.write_json(result, args.json)
        print(f"json: {args.json}")
    progress.say(f"done in {result.elapsed:.0f} s")
    return 0


FAILED = {
    "pep": "the master's pep killed",
    "box": "the master box dead: its processes killed, its links down",
    "link": "the master's client-side link down",
}


def _cluster_bench(args: argparse.Namespace, prof) -> int:  # type: ignore[no-untyped-def]
    """The two-gateway labs' figures: failover (ha) or spread (ecmp), as JSON."""
    import json

    from pep.lab import build as lab_mod
    from pep.lab import cluster_bench
    from pep.lab.plan import LabSpec

    if args.lab_command != "bench":
        raise lab_mod.LabError(f"--topology {args.topology}: `pep lab bench` (or `up`) only")
    spec = LabSpec(prof, args.topology, True, args.prefix, peer=False)
    lab = lab_mod.up(spec, lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        if args.topology == "ha":
            result = cluster_bench.failover(lab, args.reps or 5, args.failover)
            print(
                f"failover ({FAILED[args.failover]} -> the first new connection split by the "
                f"backup): median {result['failover_median_s']} s over {len(result['runs'])} "
                f"runs (the addresses moved after {result['addresses_moved_median_s']} s); "
                f"{result['failed_total']} connections failed, {result['slow_total']} took over "
                f"0.5 s, {result['unsplit_total']} went through unsplit meanwhile"
                + (
                    f"; {result['no_failover']} runs did not fail over"
                    if result["no_failover"]
                    else ""
                )
            )
            for r in result["runs"]:
                print(
                    f"  {r['failed_gateway']} failed: split by {r['backup']} after "
                    f"{r['failover_s']} s, addresses moved after {r['addresses_moved_s']} s, "
                    f"{r['failed']} failed, {r['slow']} slow, {r['succeeded_unsplit']} unsplit"
                )
        else:
            result = cluster_bench.spread(lab)
            print(
                f"spread over {result['connections']} connections: "
                + ", ".join(
                    f"{gw} {n} ({result['share'][gw]:.0%})" for gw, n in result["split"].items()
                )
                + f"; {result['failed']} failed"
            )
            a = result["after_gwa_killed"]
            print(
                f"gwa's pep killed, {a['connections']} more: {a['failed']} failed, "
                f"{a['split_by_gwb']} split by gwb, the rest through gwa unsplit"
            )
    finally:
        lab_mod.down(spec.prefix, lab)
    if getattr(args, "json", None):
        args.json.write_text(json.dumps(result, indent=1))
        print(f"json: {args.json}")
    return 0
