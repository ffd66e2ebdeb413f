"""The ``pep`` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage or config,
3 ``pep status`` found no daemon running (the LSB "program is not running" status)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pep import config as config_mod
from pep.ops.entry import exit_code
from pep.support.errors import describe

if TYPE_CHECKING:  # imported where needed: `pep --help` loads nothing of the kernel's
    from pep.kernel.owner import Owner

__all__ = ["main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (flags override it)")
    p.add_argument(
        "--interface",
        "-i",
        action="append",
        dest="interfaces",
        metavar="IFACE",
        help="ingress interface whose new TCP connections are split (repeatable; required "
        "here or as `interfaces` in the config)",
    )
    p.add_argument(
        "--listen-port",
        type=int,
        metavar="PORT",
        help="local port the redirected connections arrive on (default 5000)",
    )
    p.add_argument("--queue", type=int, metavar="N", help="NFQUEUE number for SYNs (default 0)")
    p.add_argument("--log-level", choices=config_mod.LOG_LEVELS, help="default info")
    p.add_argument(
        "--mode",
        choices=("redirect", "tproxy"),
        help="how connections reach pep: nat REDIRECT (default) or mangle TPROXY",
    )
    p.add_argument(
        "--family", choices=("ipv4", "ipv6", "both"), help="IP versions to split (default both)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pep",
        description="Transparent TCP split-connection Performance Enhancing Proxy. "
        "Needs root (or CAP_NET_ADMIN + CAP_NET_RAW).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="install the rules and split connections until SIGINT/SIGTERM",
        description="Install pep's netfilter rules, split every new TCP connection arriving on "
        "the given interfaces, and remove the rules on SIGINT/SIGTERM (exit 0).",
    )
    _common(run)
    run.add_argument(
        "--status-socket",
        metavar="PATH",
        help="unix socket `pep status` reads (default /run/pep/pep.sock, in a named netns "
        '/run/pep/netns/NAME/pep.sock; "" for none)',
    )
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by pep.ops.workers
    status = sub.add_parser(
        "status",
        help="show the running daemon's connections and counters",
        description="Ask the running daemon (over its status socket) for its live connections, "
        "totals, SYN verdicts and kernel queue counters. Exit 3 when no daemon is running.",
    )
    status.add_argument("--config", metavar="FILE", help="read status_socket from this file")
    status.add_argument("--socket", metavar="PATH", help="status socket (overrides --config)")
    status.add_argument("--json", action="store_true", help="the full status document as JSON")
    rules = sub.add_parser("rules", help="install, remove or show pep's netfilter rules")
    rules_sub = rules.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        (
            "install",
            "install the rules (replacing stale ones); nothing reads the queue, "
            "so SYNs pass unsplit until `pep run` starts",
        ),
        (
            "remove",
            "remove every rule, chain and policy route pep installed, and put back the routes "
            "it gave initial windows ([link])",
        ),
        ("show", "print pep's installed rules (iptables-save syntax) and routes, per family"),
    ):
        p = rules_sub.add_parser(name, help=text, description=text)
        if name == "install":
            _common(p)
    peer = sub.add_parser("peer", help="[peer]: pre-connected legs between two PEPs")
    peer_sub = peer.add_subparsers(dest="action", required=True, metavar="ACTION")
    peer_sub.add_parser(
        "keygen",
        help="print a new shared key (hex); the same file at both ends, mode 0600",
        description="Print a new 32-byte key as hex: `pep peer keygen > /etc/pep/peer.key && "
        "chmod 600 /etc/pep/peer.key`, then copy that file to the other PEP.",
    )
    from pep.lab import cli as lab_cli

    lab_cli.add_parser(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "interfaces": args.interfaces,
        "listen_port": args.listen_port,
        "queue": args.queue,
        "log_level": args.log_level,
        "mode": args.mode,
        "family": args.family,
        "status_socket": getattr(args, "status_socket", None),
    }


def _setup_logging(level: str, tag: str = "") -> None:
    from pep.ops import systemd

    fmt = "%(levelname)s %(name)s" + tag + ": %(message)s"
    if not systemd.under_journal():  # else the journal stamps each line itself
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=config_mod.log_level_number(level), format=fmt, stream=sys.stderr)
    # Libraries' own debug output (pyroute2 logs every netlink message) drowns pep's.
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _status(args: argparse.Namespace) -> int:
    import json

    from pep.ops.status import document as status
    from pep.ops.status import render as status_render
    from pep.ops.status import socket as status_socket

    path = args.socket
    if path is None:
        try:
            cfg = config_mod.build(config_mod.read_file(args.config) if args.config else {})
        except config_mod.ConfigError as e:
            print(f"pep: {describe(e)}", file=sys.stderr)
            return 2
        path = cfg.status_socket
        if not path:
            print(f"pep: status_socket is disabled in {args.config}", file=sys.stderr)
            return 2
    try:
        doc = status_socket.fetch(path)
    except status_socket.NotRunning as e:
        print(f"pep: {describe(e)}", file=sys.stderr)
        return 3
    except status.StatusError as e:
        print(f"pep: {describe(e)}", file=sys.stderr)
        return 1
    try:
        status.fill_kernel_queues(doc)  # a daemon without root cannot read them; we may
        text = json.dumps(doc, indent=2) + "\n" if args.json else status_render.render(doc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # decode checked the sections; one malformed deeper down is refused the same way
        why = f"{type(e).__name__}: {describe(e)}"
        print(f"pep: the daemon's status document is malformed ({why})", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if getattr(args, "worker", None) is not None:
        # A worker (re)started by its master may get the SIGHUP the master forwards before its
        # handler exists, and SIGHUP's default action ends a process: ignored until the daemon
        # sets its handler. A worker reads the file when it starts: it misses nothing.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.command == "lab":
        from pep.lab import cli as lab_cli

        return lab_cli.main(args)
    if args.command == "peer":  # keygen
        from pep.config.peer import keygen

        print(keygen())
        return 0
    if args.command == "status":
        return _status(args)
    if args.command == "rules" and args.action in ("remove", "show"):
        # Imported after parsing: --help works even where python-iptables cannot load.
        from pep.kernel import cleanup, iptables_setup, tproxy_routes

        try:
            if args.action == "remove":
                from pep.ops.daemon import remove_rules

                held = _take_ownership("")
                if isinstance(held, int):
                    return held
                with held:
                    print(f"removed {remove_rules()} rule(s) and route(s)")
            else:
                for family, tool in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
                    print(f"# IPv{family} ({tool} -S)")
                    for line in iptables_setup.show(family=family):
                        print(line.removeprefix("-6 "))
                print("# policy routing (TPROXY mode)")
                for line in tproxy_routes.show():
                    print(line)
                from pep.kernel import link_routes

                print("# initial windows on the link's routes ([link]; restored on exit)")
                for line in link_routes.show():
                    print(line)
        except (
            iptables_setup.RulesError,
            tproxy_routes.RoutingError,
            cleanup.KernelStateError,  # remove_rules: names each kind that failed
        ) as e:
            print(f"pep: {describe(e)}", file=sys.stderr)
            return 1
        return 0

    try:
        cfg = config_mod.load(args.config, _overrides(args))
        from pep.ops.reload import check_environment

        check_environment(cfg)  # what start needs besides the file: nothing installed without
    except config_mod.ConfigError as e:
        print(f"pep: {describe(e)}", file=sys.stderr)
        return 2
    # After the config check: a bad file is refused without loading pyroute2 (0.3 s).
    from pep.kernel import iptables_setup, tproxy_routes

    worker = getattr(args, "worker", None)
    _setup_logging(cfg.log_level, "" if worker is None else f"[w{worker}]")

    if args.command == "rules":
        from pep.ops.daemon import install_rules

        held = _take_ownership("")  # for as long as it installs: no status socket
        if isinstance(held, int):
            return held
        with held:
            try:
                install_rules(cfg)
            except (iptables_setup.RulesError, tproxy_routes.RoutingError) as e:
                print(f"pep: {describe(e)}", file=sys.stderr)
                return 1
        return 0

    import trio

    from pep.capture.nfq_socket import QueueError
    from pep.kernel import cleanup
    from pep.ops import systemd, workers
    from pep.ops.daemon import serve
    from pep.ops.status.document import StatusError

    def reload() -> config_mod.Config:
        return config_mod.load(args.config, _overrides(args))

    if worker is not None:
        systemd.set_parent_death_signal()
        if os.environ.get(workers.MASTER_PID_ENV) != str(os.getppid()):
            logging.getLogger("pep").error("worker %d: its master is gone; exiting", worker)
            return 1

    daemon_errors = (
        iptables_setup.RulesError,
        tproxy_routes.RoutingError,
        cleanup.KernelStateError,  # remove_rules on the way out
        QueueError,
        StatusError,
        workers.WorkerError,
        OSError,
    )
    report = lambda e: logging.getLogger("pep").error("%s", describe(e))  # noqa: E731
    if worker is not None:  # its master owns the namespace's kernel state, and its lock
        return exit_code(lambda: trio.run(serve, cfg, reload, worker), daemon_errors, report)
    held = _take_ownership(cfg.status_socket)
    if isinstance(held, int):
        return held
    lock = held.fd

    def run() -> None:
        if cfg.workers > 1:  # the workers inherit the lock: owned until the last one is gone
            trio.run(workers.supervise, cfg, argv, reload, (lock,))
        else:
            trio.run(serve, cfg, reload, None)

    with held:
        return exit_code(run, daemon_errors, report)


def _take_ownership(status_socket: str) -> Owner | int:
    """This namespace's kernel state, owned (pep.kernel.owner) before anything touches it; or
    the exit code, having said why not: 2 when another live pep owns it (nothing touched), 1
    when the lock cannot be taken at all (the runtime directory cannot be made or opened)."""
    from pep.kernel import owner

    try:
        return owner.acquire(status_socket)
    except owner.Owned as e:
        print(f"pep: {describe(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"pep: cannot take ownership of this namespace's rules and routes "
            f"({owner.lock_path()}): {describe(e)} (pep needs its runtime directory: run as "
            "root, or as the service does, with /run/pep its RuntimeDirectory)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
