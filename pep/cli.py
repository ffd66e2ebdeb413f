"""The ``pep`` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage or config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pep import config as config_mod

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
    rules = sub.add_parser("rules", help="install, remove or show pep's netfilter rules")
    rules_sub = rules.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        (
            "install",
            "install the rules (replacing stale ones); nothing reads the queue, "
            "so SYNs pass unsplit until `pep run` starts",
        ),
        ("remove", "remove every rule and chain pep installed"),
        ("show", "print pep's installed rules in iptables-save syntax"),
    ):
        p = rules_sub.add_parser(name, help=text, description=text)
        if name == "install":
            _common(p)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "interfaces": args.interfaces,
        "listen_port": args.listen_port,
        "queue": args.queue,
        "log_level": args.log_level,
    }


def _setup_logging(level: str) -> None:
    # Under systemd (JOURNAL_STREAM set) the journal stamps each line itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=config_mod.log_level_number(level), format=fmt, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pep import iptables_setup  # after parsing: --help works without python-iptables

    if args.command == "rules" and args.action in ("remove", "show"):
        try:
            if args.action == "remove":
                print(f"removed {iptables_setup.remove()} rule(s)")
            else:
                for line in iptables_setup.show():
                    print(line)
        except iptables_setup.RulesError as e:
            print(f"pep: {e}", file=sys.stderr)
            return 1
        return 0

    try:
        cfg = config_mod.load(args.config, _overrides(args))
    except config_mod.ConfigError as e:
        print(f"pep: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)

    if args.command == "rules":
        from pep.daemon import rule_spec

        try:
            iptables_setup.install(rule_spec(cfg))
        except iptables_setup.RulesError as e:
            print(f"pep: {e}", file=sys.stderr)
            return 1
        return 0

    import trio

    from pep.daemon import serve
    from pep.nfq_socket import QueueError

    try:
        trio.run(serve, cfg)
    except (iptables_setup.RulesError, QueueError) as e:
        logging.getLogger("pep").error("%s", e)
        return 1
    except OSError as e:
        logging.getLogger("pep").error("%s", e)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
