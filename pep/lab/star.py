"""The star lab (``--topology star``): a hub serving N terminals, each with its plan (pure).

A satellite operator's PEP runs at the hub, which serves a star of terminals through one
carrier; each terminal's plan is a queue at the hub's modem draining at the plan's rate::

    server ─── hub (pep: [link], plans, peer listener) ─── link (delay line, modem) ─┬─ t1 ─ c1
    eth0 .0.2  lan0 .0.1 | sat0 .1.1           hub0 .1.2 | br0 .2.1 (a bridge)        └─ t2 ─ c2
                                                       terminal I: sat0 .2.(10+I) | lan0 .(100+I).1

Per terminal ``tI`` (a terminal's modem and router, with its own pep unless
``--terminal-pep no``) and its client ``cI`` on the terminal's LAN 10.81.(100+I).0/24. The
link node emulates the hub's modem with htb on each direction's egress: a root class at the
carrier's rate, and one class per terminal at its plan (ceil; its guaranteed rate is its
weighted part of the carrier), each with a FIFO one BDP of its plan deep (what a modem
buffers), matched by the terminal's addresses. Addresses are 10.81.x.y inside the lab's own
namespaces. Everything here is pure: pep.lab.star_build builds it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pep.lab.plan import Iface
from pep.lab.profiles import LinkProfile, ParseError, parse_rate

__all__ = [
    "MAX_TERMINALS",
    "SERVER_IP",
    "HtbClass",
    "Plan",
    "Star",
    "add_options",
    "default_plans",
    "parse_plans",
    "spec_fields",
]

SERVER_IP = "10.81.0.2"
HUB = {"lan0": "10.81.0.1", "sat0": "10.81.1.1"}
LINK = {"hub0": "10.81.1.2", "br0": "10.81.2.1"}
PEER_PORT = 5001
MAX_TERMINALS = 32  # 16 + 2N namespaces; the lab's addressing allows 155
# htb: a class's bucket holds 2 ms of data (at least 4000 bytes), as the symmetric lab's tbf
# (pep.lab.profiles.LinkProfile.tbf); quantum one full-sized frame: classes take turns per
# packet, so a terminal's burst never delays another's by more than a frame.
BUCKET_S, BUCKET_MIN = 0.002, 4000


@dataclass(frozen=True, slots=True)
class Plan:
    """One terminal's plan, bit/s: what the hub may send it (down), what it may send (up)."""

    down: int
    up: int

    def text(self) -> str:
        return f"{self.down / 1e6:g}/{self.up / 1e6:g} Mbit/s"


def default_plans(profile: LinkProfile, n: int) -> tuple[Plan, ...]:
    """The profile's plans: half the carrier each way per terminal (GEO: 10/2.5 Mbit/s), so
    two terminals fill the carrier and four oversubscribe it twice."""
    down, up = profile.down_bps or 0, profile.up_bps or 0
    return tuple(Plan(down // 2, up // 2) for _ in range(n))


def parse_plans(text: str, n: int, profile: LinkProfile) -> tuple[Plan, ...]:
    """``--plans``: ``10mbit,10mbit,5mbit`` (downlink; the uplink in the carrier's proportion)
    or ``10mbit/2mbit,...``; one entry for all terminals or one per terminal."""
    down_c, up_c = profile.down_bps or 0, profile.up_bps or 0
    items = [i.strip() for i in text.split(",") if i.strip()]
    if len(items) not in (1, n):
        raise ParseError(f"--plans {text!r}: give one plan, or one per terminal ({n})")
    out = []
    for item in items:
        down_text, _, up_text = item.partition("/")
        down = parse_rate(down_text)
        up = parse_rate(up_text) if up_text else (down * up_c // down_c if down_c else 0)
        if not down or not up:
            raise ParseError(f"--plans {item!r}: a plan is a rate above 0 each way")
        if (down_c and down > down_c) or (up_c and up > up_c):
            raise ParseError(
                f"--plans {item!r}: above the carrier ({down_c / 1e6:g}/{up_c / 1e6:g} Mbit/s)"
            )
        out.append(Plan(down, up))
    return tuple(out * n if len(out) == 1 else out)


def add_options(parser: argparse.ArgumentParser) -> None:
    """``pep lab up/bench``'s options for ``--topology star``."""
    g = parser.add_argument_group("star (--topology star)")
    g.add_argument(
        "--terminals", type=int, metavar="N",
        help="terminals behind the hub, 2 to 32 (default 2; bench 4)",
    )  # fmt: skip
    g.add_argument(
        "--terminal-pep", choices=("yes", "no"), default="yes",
        help="whether each terminal runs its own pep with [peer] to the hub (default yes)",
    )  # fmt: skip
    g.add_argument(
        "--plans", metavar="LIST",
        help="each terminal's downlink plan, e.g. 10mbit,10mbit,5mbit, or DOWN/UP "
        "(10mbit/2mbit); one for all or one per terminal (default half the carrier each way)",
    )  # fmt: skip


def spec_fields(options: Any, profile: LinkProfile, terminals: int) -> dict[str, object]:
    """LabSpec's star fields from ``pep lab``'s options (``--terminals``, default
    ``terminals``; ``--plans``, parsed here, so a bad one is a usage error before anything is
    built; ``--terminal-pep``); none for another topology."""
    if options.topology != "star":
        return {}
    n = options.terminals if options.terminals is not None else terminals
    plans = parse_plans(options.plans, n, profile) if options.plans else ()
    return {"terminals": n, "plans": plans, "terminal_pep": options.terminal_pep == "yes"}


@dataclass(frozen=True, slots=True)
class HtbClass:
    """One terminal's class at the modem: its plan (``ceil``), its weighted part of the
    carrier (``rate``), its bucket, its FIFO's length in bytes, the networks it matches."""

    minor: int  # class 1:minor, its FIFO qdisc minor:
    rate: int  # bytes/s
    ceil: int  # bytes/s
    burst: int  # bytes
    limit: int  # bytes: one BDP of the plan, plus the bucket (as the symmetric lab's tbf)
    networks: tuple[str, ...]


@dataclass(frozen=True)
class Star:
    """The star of ``len(plans)`` terminals over ``profile``'s carrier."""

    profile: LinkProfile
    plans: tuple[Plan, ...]
    terminal_pep: bool = True

    def __post_init__(self) -> None:
        if not 2 <= len(self.plans) <= MAX_TERMINALS:
            raise ParseError(f"--terminals {len(self.plans)}: from 2 to {MAX_TERMINALS}")

    @property
    def names(self) -> list[str]:
        return [f"t{i}" for i in range(1, len(self.plans) + 1)]

    @staticmethod
    def modem(i: int) -> str:
        """Terminal ``i``'s address on the terminals' segment."""
        return f"10.81.2.{10 + i}"

    @staticmethod
    def lan(i: int) -> str:
        return f"10.81.{100 + i}.0/24"

    @staticmethod
    def client(i: int) -> str:
        return f"10.81.{100 + i}.2"

    def networks(self, i: int) -> tuple[str, ...]:
        """Terminal ``i``'s addresses as the hub sees them: its LAN and its modem."""
        return (self.lan(i), f"{self.modem(i)}/32")

    def nodes(self) -> list[str]:
        n = len(self.plans)
        return ["server", "hub", "link", *[f"t{i}" for i in range(1, n + 1)],
                *[f"c{i}" for i in range(1, n + 1)]]  # fmt: skip

    def pep_nodes(self) -> list[str]:
        return ["hub", *(self.names if self.terminal_pep else [])]

    def links(self) -> list[tuple[Iface, Iface]]:
        """veth pairs; the link node's ports to the terminals (``tI``, no address) go into its
        bridge br0 (``LINK['br0']``)."""
        out = [
            (Iface("server", "eth0", SERVER_IP), Iface("hub", "lan0", HUB["lan0"])),
            (Iface("hub", "sat0", HUB["sat0"]), Iface("link", "hub0", LINK["hub0"])),
        ]
        for i in range(1, len(self.plans) + 1):
            out.append((Iface(f"t{i}", "sat0", self.modem(i)), Iface("link", f"t{i}", "")))
            out.append(
                (
                    Iface(f"t{i}", "lan0", f"10.81.{100 + i}.1"),
                    Iface(f"c{i}", "eth0", self.client(i)),
                )
            )
        return out

    def routes(self) -> dict[str, list[str]]:
        n = range(1, len(self.plans) + 1)
        routes = {
            "server": ["default via 10.81.0.1"],
            # one route per terminal, as a hub has: where pep puts each plan's initial windows
            "hub": ["10.81.2.0/24 via 10.81.1.2", *(f"{self.lan(i)} via 10.81.1.2" for i in n)],
            "link": [
                "10.81.0.0/24 via 10.81.1.1",
                *(f"{self.lan(i)} via {self.modem(i)}" for i in n),
            ],
        }
        for i in n:
            routes[f"t{i}"] = ["default via 10.81.2.1"]
            routes[f"c{i}"] = [f"default via 10.81.{100 + i}.1"]
        return routes

    def terminals_file(self) -> str:
        """The hub's plans file (pep.config.terminals): rates seen from the hub."""
        lines = ["# the lab's terminals: NAME EGRESS INGRESS NETWORKS (written by pep lab)"]
        for i, plan in enumerate(self.plans, start=1):
            lines.append(f"t{i} {plan.down}bit {plan.up}bit {' '.join(self.networks(i))}")
        return "\n".join(lines) + "\n"

    def link_table(self, node: str, terminals_file: str) -> dict[str, str] | None:
        """A PEP node's [link]: the hub's sends the carrier's downlink and holds the plans; a
        terminal's sends its plan's uplink."""
        p = self.profile
        if p.rtt_ms < 1 or not p.down_bps or not p.up_bps:
            return None
        if node == "hub":
            egress, ingress = p.down_bps, p.up_bps
        else:
            plan = self.plans[int(node[1:]) - 1]
            egress, ingress = plan.up, plan.down
        table = {
            "interface": "sat0",
            "rtt": f"{p.rtt_ms:g}ms",
            "egress_rate": f"{egress}bit",
            "ingress_rate": f"{ingress}bit",
        }
        if node == "hub":
            table["terminals_file"] = terminals_file
        return table

    def peer_table(self, node: str, key_file: str) -> dict[str, object]:
        """The hub's peer listener takes the terminals' pools; each terminal pep keeps one."""
        if node == "hub":
            return {"key_file": key_file, "listen": f"{HUB['sat0']}:{PEER_PORT}",
                    "allow": ["10.81.2.0/24"]}  # fmt: skip
        return {"key_file": key_file, "connect": f"{HUB['sat0']}:{PEER_PORT}"}

    def classes(self, direction: str, plans: tuple[Plan, ...] | None = None) -> list[HtbClass]:
        """The modem's terminal classes for ``direction`` ("down": on br0, matched by
        destination; "up": on hub0, by source)."""
        plans = plans or self.plans
        carrier = (self.profile.down_bps if direction == "down" else self.profile.up_bps) or 0
        rates = [p.down if direction == "down" else p.up for p in plans]
        out = []
        for i, rate in enumerate(rates, start=1):
            share = min(rate, carrier * rate // sum(rates))  # weighted part of the carrier
            queue = max(64 * 1024, int(rate / 8 * self.profile.queue_s))  # one BDP of the plan
            burst = max(BUCKET_MIN, int(rate / 8 * BUCKET_S))
            out.append(
                HtbClass(
                    minor=0x10 + i,
                    rate=share // 8,
                    ceil=rate // 8,
                    burst=burst,
                    limit=queue + burst,
                    networks=self.networks(i),
                )
            )
        return out

    def carrier(self, direction: str) -> int:
        """The carrier's rate this way, bytes/s (the htb root class)."""
        return ((self.profile.down_bps if direction == "down" else self.profile.up_bps) or 0) // 8
