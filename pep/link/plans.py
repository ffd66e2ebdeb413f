"""The sharer's terminal plans: each terminal's pacing cap, and what its link legs did.

pep.link.pacer's Sharer holds one ``Plans``: the table of terminals (pep.config.terminals) to
find a new leg's terminal by the far side's address, each plan's cap in the units the sharer
divides (payload bytes/s, as ``Link.pacing_capacity`` counts them for the carrier), and per
terminal the counters pep status and the metrics show. The counters are kept for every
terminal that ever had a leg (at most the configured ones, plus ``OTHER`` for addresses in no
terminal), so a terminal's counters never go backwards while pep runs: the metrics' label set
stays bounded by the configuration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pep.config.link import Link
from pep.config.terminals import OTHER, TerminalTable
from pep.link.tcpinfo import TcpInfo

__all__ = ["Plans", "TerminalCounts", "lost"]


def lost(info: TcpInfo) -> int:
    """Segments TCP resent because they were lost: its retransmissions less those the receiver
    reported as duplicates (D-SACK, RFC 2883): what the path dropped of this leg's data, as the
    sender saw it."""
    return max(0, info.total_retrans - info.dsack_dups)


@dataclass(slots=True)
class TerminalCounts:
    """What one terminal's legs that have closed did."""

    bytes_sent: int = 0
    retransmits: int = 0
    lost: int = 0


class _Leg(Protocol):
    """What the snapshot reads of a link leg (pep.link.pacer.LinkLeg)."""

    @property
    def terminal(self) -> str | None: ...
    @property
    def active(self) -> bool: ...
    @property
    def share(self) -> float: ...
    @property
    def info(self) -> TcpInfo | None: ...
    @property
    def rate(self) -> float: ...


@dataclass
class Plans:
    """The terminals of a [link], their caps at one MTU, and their counters."""

    table: TerminalTable = field(default_factory=TerminalTable)
    caps: dict[str, float] = field(default_factory=dict)  # payload bytes/s per terminal
    counts: dict[str, TerminalCounts] = field(default_factory=dict)
    # The link as each terminal sees it (Link.for_terminal), made once per plan: a leg's
    # buffers are read from it, not rebuilt per connection.
    links: dict[str, Link] = field(default_factory=dict)

    @classmethod
    def of(cls, link: Link, mtu: int, previous: Plans | None = None) -> Plans:
        """The plans of ``link``; a reload's keep the ``previous`` ones' counters."""
        table = link.plans()
        links = {t.name: link.for_terminal(t) for t in table}
        caps = {name: seen.pacing_capacity(mtu) for name, seen in links.items()}
        return cls(table, caps, previous.counts if previous is not None else {}, links)

    def terminal(self, far: str | None) -> str | None:
        """The name of the terminal behind ``far`` (the address across the link), or None."""
        found = self.table.lookup(far) if self.caps else None
        return found.name if found is not None else None

    def _counts(self, name: str | None) -> TerminalCounts:
        key = name if name is not None else OTHER
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = TerminalCounts()
        return counts

    def joined(self, name: str | None) -> None:
        """A leg of this terminal joined: it is listed from now on."""
        self._counts(name)

    def closed(self, name: str | None, info: TcpInfo) -> None:
        c = self._counts(name)
        c.bytes_sent += info.bytes_sent
        c.retransmits += info.total_retrans
        c.lost += lost(info)

    def snapshot(self, legs: Iterable[_Leg]) -> list[dict[str, Any]]:
        """pep status's terminals: each one that has had a link leg, by name (``OTHER``, for
        addresses in no terminal, last), with its plan and what its legs do now."""
        live: dict[str, dict[str, Any]] = {}
        for leg in legs:
            row = live.setdefault(leg.terminal or OTHER, _row())
            row["legs"] += 1
            if leg.active:
                row["legs_active"] += 1
                row["share_bps"] += leg.share * 8
                row["send_rate_bps"] += leg.rate * 8
            if leg.info is not None:
                row["bytes_sent"] += leg.info.bytes_sent
                row["retransmits"] += leg.info.total_retrans
                row["lost"] += lost(leg.info)
        out = []
        for name in sorted(self.counts, key=lambda n: (n == OTHER, n)):
            c, plan = self.counts[name], self.table.by_name.get(name)
            row = live.get(name) or _row()
            out.append(
                {
                    "name": name,
                    "egress_bps": plan.egress_rate if plan is not None else None,
                    "ingress_bps": plan.ingress_rate if plan is not None else None,
                    "plan_capacity_bps": round(self.caps[name] * 8) if name in self.caps else None,
                    "legs": row["legs"],
                    "legs_active": row["legs_active"],
                    "share_bps": round(row["share_bps"]),
                    "send_rate_bps": round(row["send_rate_bps"]),
                    "bytes_sent": c.bytes_sent + row["bytes_sent"],
                    "retransmits": c.retransmits + row["retransmits"],
                    "lost": c.lost + row["lost"],
                }
            )
        return out


def _row() -> dict[str, Any]:
    return {
        "legs": 0, "legs_active": 0, "share_bps": 0.0, "send_rate_bps": 0.0, "bytes_sent": 0,
        "retransmits": 0, "lost": 0,
    }  # fmt: skip
