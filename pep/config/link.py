"""The satellite link as pep knows it (``[link]``), and every number that follows from it.

The operator describes the link once: the interface facing it, its round-trip time and the
rate each way. From those pep derives, here and nowhere else (sans-IO, unit-tested):

- the route metrics ``initcwnd`` / ``initrwnd`` on routes leaving through the interface: one
  bandwidth-delay product of the direction this node sends / receives, so a split flow's first
  flight fills the link instead of slow-starting over 600 ms round trips (pep.kernel.link_routes
  applies them);
- the send and receive buffers of link-leg sockets, sized from the BDP, so no system-wide
  tcp_rmem/tcp_wmem change is needed;
- the pacing capacity that pep.link.pacer divides among the flows sending into the link, in
  TCP payload bytes per second (what SO_MAX_PACING_RATE counts), so that all of them together
  never send faster than the link takes them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pep.config import schema as checks
from pep.config.leg import LegTuning
from pep.config.schema import key
from pep.config.terminals import (
    Terminal,
    TerminalsFile,
    TerminalTable,
    plans_problem,
    terminal_tables,
    terminals_file,
)

__all__ = ["ETH_OVERHEAD", "Link", "default_congestion", "mss_for"]

# What a full-sized segment carries beyond its payload on an Ethernet-framed link: the 14-byte
# Ethernet header (counted by tc's tbf/htb on the egress device, qdisc_pkt_len) plus IP and TCP
# headers with the timestamps option. TCP's internal pacing counts payload bytes only
# (tcp_update_skb_after_send uses the data skb's length), so the pacing capacity is the link
# rate scaled by payload / frame.
ETH_OVERHEAD = 14
_TCP_HEADERS = {4: 20 + 20 + 12, 6: 40 + 20 + 12}  # IPv4/IPv6 + TCP + timestamps option
# The limits the issue sets for [link]: a link is at least 1 ms and at most 5 s long.
RTT_MIN, RTT_MAX = 0.001, 5.0
RATE_MIN, RATE_MAX = 8_000, 400_000_000_000  # 8 kbit/s .. 400 Gbit/s
# Route metrics are u32 (RTAX_INITCWND/INITRWND); the kernel caps initcwnd at the socket's
# snd_cwnd_clamp only. 65535 segments keeps a typo'd rate from asking for an absurd first
# flight (that is 94 MB at a 1448-byte MSS: a 1.25 Gbit/s GEO link).
INIT_WINDOW_MIN, INIT_WINDOW_MAX = 10, 65535  # 10: the kernel's TCP_INIT_CWND (RFC 6928)
# SO_SNDBUF/SO_RCVBUF: the kernel doubles the value for its bookkeeping and caps it at
# INT_MAX / 2; below 256 KiB a link leg gains nothing over the kernel's autotuning default.
BUFFER_MIN, BUFFER_MAX = 256 * 1024, 1 << 30
# [link] outage_timeout's default, seconds (see Link.outage_timeout).
OUTAGE_TIMEOUT = 600.0
# TCP_RTO_MAX_MS takes 1000-120000 ms (checked on 6.18: EINVAL outside, docs/DESIGN.md).
RTO_MAX_MIN, RTO_MAX_MAX = 1.0, 120.0
# Congestion controls a satellite link leg wants, best first: BBR paces and does not read
# random loss as congestion; the kernel default otherwise.
PREFERRED_CONGESTION = ("bbr",)


def default_congestion(available: list[str] | None = None) -> str | None:
    """The link legs' congestion control when ``[link]`` names none: bbr where available."""
    if available is None:
        available = checks.available_congestion()
    for name in PREFERRED_CONGESTION:
        if available is not None and name in available:
            return name
    return None


@dataclass(frozen=True, slots=True)
class Link:
    """The ``[link]`` table (each key declared once, as pep.config's keys are). Rates are
    bit/s as tc counts them (Ethernet frames); ``rtt`` is the link's own round trip in
    seconds, not the whole path's."""

    interface: str = key(check=checks.interface_name)  # the interface that faces the link
    rtt: float = key(check=checks.duration(RTT_MIN, RTT_MAX))
    egress_rate: int = key(check=checks.rate(RATE_MIN, RATE_MAX))  # what this node sends
    ingress_rate: int = key(check=checks.rate(RATE_MIN, RATE_MAX))  # what it receives
    # The link legs' congestion control unless a leg's own `congestion` is set.
    congestion: str | None = key(factory=default_congestion, check=checks.congestion)
    # How long pep holds a connection through an outage of the link (a rain fade, a lost
    # satellite) before it gives up on it: the link legs' TCP_USER_TIMEOUT, and how long a new
    # connection waits for the link. Ten minutes: Ka-band fades last seconds to minutes, and
    # end-to-end TCP gives up after tcp_retries2 (15 retransmissions, about 15 minutes).
    outage_timeout: float = key(OUTAGE_TIMEOUT, checks.duration(1.0, 86400.0))
    # The link legs' retransmission timeout never backs off beyond this (TCP_RTO_MAX_MS), so
    # they resend within this long of the link's return. Unset: max(1 s, 1.5 x rtt).
    rto_max: float | None = key(None, checks.duration(RTO_MAX_MIN, RTO_MAX_MAX))
    # A hub's terminals and their plans (pep.config.terminals), inline and/or from a file: the
    # carrier is then shared among the terminals that are sending, weighted by plan and never
    # above one (pep.link.terminalshare). None: one max-min share over all link legs.
    terminals: tuple[Terminal, ...] = key((), terminal_tables)
    terminals_file: TerminalsFile | None = key(None, terminals_file)  # noqa: RUF009

    def problem(self) -> tuple[str, object, str] | None:
        """What is wrong between the terminals, or with a plan against the carrier (config.build
        reports it), or None."""
        return plans_problem(
            self.egress_rate, self.ingress_rate, self.terminals, self.terminals_file
        )

    def plans(self) -> TerminalTable:
        """Every terminal, inline and from the file, for lookups by address."""
        more = self.terminals_file.terminals if self.terminals_file is not None else ()
        return TerminalTable((*self.terminals, *more))

    def for_terminal(self, terminal: Terminal) -> Link:
        """The link as one terminal sees it: its plan's rates, the carrier's RTT. Every number
        derived here (BDP, initial windows, buffers, pacing capacity) then follows the plan, not
        the carrier: a 1 Gbit/s carrier's 75 MB BDP is never a 10 Mbit/s terminal's window."""
        return dataclasses.replace(
            self,
            egress_rate=terminal.egress_rate,
            ingress_rate=terminal.ingress_rate,
            terminals=(),
            terminals_file=None,
        )

    def bdp(self, direction: str) -> int:
        """Bytes in flight that fill ``egress`` or ``ingress`` for one round trip."""
        bps = self.egress_rate if direction == "egress" else self.ingress_rate
        return int(bps * self.rtt / 8)

    def route_metrics(self, mtu: int, family: int = 4) -> dict[str, int]:
        """initcwnd: one egress BDP in segments (the first flight fills the link; pacing keeps
        it from arriving as a burst); initrwnd: one ingress BDP (the far end's first flight is
        not held back by our window)."""
        mss = mss_for(mtu, family)

        def segments(direction: str) -> int:
            n = math.ceil(self.bdp(direction) / mss)
            return min(INIT_WINDOW_MAX, max(INIT_WINDOW_MIN, n))

        return {"initcwnd": segments("egress"), "initrwnd": segments("ingress")}

    @property
    def sndbuf(self) -> int:
        """SO_SNDBUF for link legs: two egress BDPs (BBR keeps up to 2 BDP in flight, and the
        relay needs room behind it to keep the link busy). The kernel doubles it."""
        return _buffer(2 * self.bdp("egress"))

    @property
    def rcvbuf(self) -> int:
        """SO_RCVBUF for link legs: two ingress BDPs, so the window covers the BDP with the
        RTT doubled by a full modem queue. The kernel doubles it for its overhead."""
        return _buffer(2 * self.bdp("ingress"))

    def pacing_capacity(self, mtu: int, family: int = 4) -> float:
        """Payload bytes/s that fill ``egress_bps`` of frames (see ETH_OVERHEAD)."""
        mss = mss_for(mtu, family)
        return self.egress_rate / 8 * mss / (mss + _TCP_HEADERS[family] + ETH_OVERHEAD)

    @property
    def min_share(self) -> float:
        """The least pacing rate a flow gets, payload bytes/s: two segments per round trip,
        below which a flow's ACK clock (delayed ACKs every second segment) stalls."""
        return 2 * 1448 / self.rtt

    @property
    def tick(self) -> float:
        """How often the sharer samples its flows: a twelfth of the RTT, between 10 and 50 ms.
        New flows take their share at once; a flow that has sent all it was given gives its
        share back at the next tick. Measured on GEO (docs/BENCHMARKS.md): the web page took
        8.1 s with a 100 ms tick and a flow idle only after a whole tick without sending,
        6.1-6.9 s with this tick and idle at the first tick with nothing left to send."""
        return min(0.05, max(0.01, self.rtt / 12))

    @property
    def retransmit_cap(self) -> float:
        """The link legs' RTO cap, seconds: ``rto_max``, else 1.5 round trips and at least the
        kernel's floor of 1 s. Above the link's RTT with some queueing (the RTO itself is
        capped too: a cap below the RTT would time out every flight), below 2 RTTs, so a leg
        resends within about a round trip of the link's return."""
        if self.rto_max is not None:
            return self.rto_max
        return min(RTO_MAX_MAX, max(RTO_MAX_MIN, 1.5 * self.rtt))

    @property
    def heartbeat(self) -> int:
        """Seconds between keepalive probes on idle pooled connections (pep.peer.pool): a
        probe answered says the link is up, one unanswered that it may be down (pep.link.
        watch). Two round trips and at least 1 s: TCP_KEEPIDLE/KEEPINTVL count whole seconds."""
        return max(1, math.ceil(2 * self.rtt))

    @property
    def silence(self) -> float:
        """How long nothing may arrive over the link, while something waits for an answer,
        before pep takes the link for down: three round trips, at least 1.5 s (two heartbeats
        at the shortest)."""
        return max(1.5, 3 * self.rtt)

    def leg_tuning(self, tuning: LegTuning) -> LegTuning:
        """A link leg's tuning: what the leg's own table sets, else the link's: BDP-sized
        buffers, its congestion control, and the outage settings (TCP_USER_TIMEOUT from
        ``outage_timeout``, the RTO cap)."""

        def own(name: str, link_value: object) -> object:
            value = getattr(tuning, name)
            return value if value is not None else link_value

        return dataclasses.replace(
            tuning,
            sndbuf=own("sndbuf", self.sndbuf),
            rcvbuf=own("rcvbuf", self.rcvbuf),
            congestion=own("congestion", self.congestion),
            user_timeout=own("user_timeout", self.outage_timeout),
            rto_max=own("rto_max", self.retransmit_cap),
        )

    def arrives_on(self, interfaces: tuple[str, ...]) -> bool:
        """Whether connections arrive on the link interface (it is one of the ingress
        ``interfaces``, by name or by an iptables "+" wildcard): then accepted sockets are
        link legs."""
        name = self.interface
        return any(i == name or (i.endswith("+") and name.startswith(i[:-1])) for i in interfaces)

    def describe(self) -> str:
        from pep.config.units import format_duration, format_rate

        return (
            f"{self.interface}: {format_duration(self.rtt)} RTT, "
            f"egress {format_rate(self.egress_rate)}, ingress {format_rate(self.ingress_rate)}, "
            f"link legs {self.congestion or 'kernel default congestion control'}"
        )


def mss_for(mtu: int, family: int = 4) -> int:
    """The MSS of a full-sized segment with timestamps, as the kernel will use it."""
    return max(88, mtu - _TCP_HEADERS[family])  # 88: TCP_MIN_MSS


def _buffer(nbytes: int) -> int:
    return min(BUFFER_MAX, max(BUFFER_MIN, nbytes))
