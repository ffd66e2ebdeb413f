"""The IO shell of link sharing: link-leg sockets, their tcp_info, their SO_MAX_PACING_RATE.

pep.link.fairshare decides the shares; this module owns what touches the kernel. One ``Sharer`` per
process (each worker shares its own flows: see docs/DESIGN.md for why that is close enough),
one task (``run``) that samples the active flows every ``Link.tick`` and applies new caps, and
the hooks the rest of pep calls:

- ``faces_link(address)``: does the route to this address leave through the link interface?
  (the session asks it for both legs: the client leg faces the link when connections arrive
  on it, the upstream leg when the destination is routed through it);
- ``open(sock, stats, up)`` / ``close(leg)``: a link-leg socket joins / leaves the table;
- ``LinkLeg.wake()``: the relay engine is about to write into an idle link-leg socket, so it
  gets its share before its first byte (pep.split.relay checks ``leg.active`` per chunk).

SO_MAX_PACING_RATE (SOL_SOCKET 47) switches on TCP's internal pacing with no fq qdisc
(checked on this kernel: DESIGN.md) and caps BBR's own pacing rate; it can change at any time.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass

import trio

from pep.config.link import Link
from pep.link import tcpinfo
from pep.link.fairshare import FlowShare
from pep.link.plans import Plans
from pep.link.routequery import RouteCache
from pep.link.slots import WorkerSlots
from pep.link.terminalshare import PlanShareTable
from pep.split.relay import RelayStats
from pep.split.sockopts import restart_congestion

__all__ = ["SO_MAX_PACING_RATE", "LinkLeg", "LinkTotals", "Sharer"]

log = logging.getLogger(__name__)

SO_MAX_PACING_RATE = 47  # include/uapi/asm-generic/socket.h
TCP_SYN_RECV = 3  # include/net/tcp_states.h
TCP_CA_OPEN = 0  # tcpi_ca_state: not in recovery or loss (include/uapi/linux/tcp.h)
# A link leg sending for longer than BBR's 10-s min-RTT window (tcp_bbr.c, bbr_min_rtt_win_sec)
# gets its congestion control restarted this long after it joined or was last restarted, so it
# never enters PROBE_RTT: cwnd 4 for at least 200 ms and a link round trip, nearly silent, which
# is what six parallel uploads on GEO spent (pooled: 10.99-12.00 s for 10.64 s of serialisation;
# refreshed: 10.64-10.82 s, docs/BENCHMARKS.md). PROBE_RTT exists to find the path's RTT under
# a queue the flow built itself; pep's caps keep the link's queue empty, and the restarted BBR
# takes TCP's own 5-minute minimum RTT (tcp_min_rtt_wlen), so nothing is lost by skipping it.
BBR_REFRESH = 8.0
# After a flow wakes or leaves, the others' caps are recomputed this much later, so a burst of
# new flows costs one reshare, not one per flow (the waking flow has its own share at once).
COALESCE = 0.005


class LinkLeg:
    """One link-leg socket in the sharer (pep.split.hooks.Paced: ``active`` is what the relay
    engine checks before it writes)."""

    __slots__ = ("cappable", "far", "flow", "fresh_at", "info", "sharer", "sock", "stats", "up")

    def __init__(
        self,
        sharer: Sharer,
        flow: FlowShare,
        sock: socket.socket,
        stats: RelayStats,
        up: bool,
        far: str | None = None,
    ) -> None:
        self.sharer, self.flow, self.sock, self.stats, self.up = sharer, flow, sock, stats, up
        self.far = far  # the address across the link: its terminal's (pep.link.plans)
        self.info: tcpinfo.TcpInfo | None = None  # the last sample
        # Whether a cap may be set now. A Fast Open child is relayed while still in SYN_RECV,
        # and the kernel's pacing timer sends nothing in that state (tcp_tsq_write: established
        # states only): a cap set before its first write would hold the first flight after 10
        # unpaced segments until the handshake's ACK, a round trip later (measured: 30 KB took
        # 1.2 s instead of 0.6 on GEO). With no cap when that ACK arrives, though, everything
        # written meanwhile leaves in one burst at BBR's start-up rate (1 MB per flow at once:
        # three flows overflowed the one-BDP modem queue). So such a leg is capped by the
        # reshare just after its first write (COALESCE later): its first flight, bounded in
        # SYN_RECV by the peer's SYN window, has left, and the ACK is a link RTT away.
        self.cappable = True
        self.fresh_at = trio.current_time()  # when its congestion control last started

    @property
    def active(self) -> bool:
        return self.flow.active

    @property
    def share(self) -> float:
        return self.flow.cap

    @property
    def terminal(self) -> str | None:
        return self.flow.terminal

    @property
    def rate(self) -> float:
        """Payload bytes/s it sent during the last tick (pep status's per-terminal rates)."""
        return self.flow.rate

    @property
    def written(self) -> int:
        """Bytes pep has written into this socket (the relay's count for its direction)."""
        return self.stats.up if self.up else self.stats.down

    def wake(self) -> None:
        self.sharer.wake(self)

    def close(self) -> None:
        self.sharer.close(self)


@dataclass(slots=True)
class LinkTotals:
    """What the link leg did, for pep status and the metrics."""

    flows: int = 0  # link-leg sockets opened
    bytes_sent: int = 0  # by closed link-leg sockets (live ones are added when reported)
    retransmits: int = 0  # segments, by closed link-leg sockets
    congestion_restarts: int = 0  # BBR restarted before its PROBE_RTT (BBR_REFRESH)
    send_rate: float = 0.0  # payload bytes/s over the last tick, all active flows
    ticks: int = 0  # ticks that sampled the active flows
    tick_cpu: float = 0.0  # CPU seconds those ticks took (sample, reshare, apply): its cost


class Sharer:
    """Shares ``link.egress_rate`` among this process's link-leg sockets."""

    def __init__(
        self,
        link: Link,
        ifindex: int,
        mtu: int,
        routes: RouteCache | None = None,
        slots: WorkerSlots | None = None,
    ) -> None:
        self.link, self.ifindex, self.mtu = link, ifindex, mtu
        self.slots = slots  # with workers: the others' active counts
        self.plans = Plans.of(link, mtu)  # the terminals' plans, when [link] has them
        self.table = PlanShareTable(link.pacing_capacity(mtu), link.min_share, self.plans.caps)
        self.routes = routes if routes is not None else RouteCache()
        self.legs: dict[int, LinkLeg] = {}
        self.totals = LinkTotals()
        self._next_fid = 0
        self._wakeup = trio.Event()

    # --- hooks for the session and the relay -------------------------------------------------

    def faces_link(self, host: str) -> bool:
        return self.routes.oif(host) == self.ifindex

    def open(
        self, sock: socket.socket, stats: RelayStats, up: bool, far: str | None = None
    ) -> LinkLeg:
        """A link-leg socket joins, idle, with an equal share as its cap until it wakes;
        ``far``: the address across the link, whose terminal's plan it shares."""
        self._next_fid += 1
        fid = self._next_fid
        terminal = self.plans.terminal(far)
        self.plans.joined(terminal)
        cap = self.table.add(fid, terminal)
        leg = LinkLeg(self, self.table.flows[fid], sock, stats, up, far)
        self.legs[fid] = leg
        self.totals.flows += 1
        with contextlib.suppress(OSError):
            leg.info = tcpinfo.read(sock)
            leg.cappable = leg.info.state != TCP_SYN_RECV
        self._set_cap(leg, cap)
        return leg

    def close(self, leg: LinkLeg) -> None:
        """The connection is done (call before its sockets close, to read the last tcp_info):
        its share goes back to the others at once."""
        if self.legs.pop(leg.flow.fid, None) is None:
            return
        with contextlib.suppress(OSError):  # already closed: the last sample stands
            leg.info = tcpinfo.read(leg.sock)
        if leg.info is not None:
            self.totals.bytes_sent += leg.info.bytes_sent
            self.totals.retransmits += leg.info.total_retrans
            self.plans.closed(leg.terminal, leg.info)
        was_active = leg.flow.active
        self.table.remove(leg.flow.fid)
        if was_active:
            self._wakeup.set()

    def wake(self, leg: LinkLeg) -> None:
        self._rescale(len(self.table.active) + 1)
        cap = self.table.wake(leg.flow.fid)
        if cap is not None:
            self._set_cap(leg, cap)
        self._wakeup.set()  # the others' caps follow; a Fast Open child gets its own then

    def resize(self, link: Link, mtu: int) -> None:
        """A reloaded [link] with another rate or RTT: the next reshare applies it."""
        self.link, self.mtu = link, mtu
        self.table.resize(link.pacing_capacity(mtu), link.min_share)
        self.plans = Plans.of(link, mtu, self.plans)  # live legs: their terminal again
        for leg in self.legs.values():
            leg.flow.terminal = self.plans.terminal(leg.far)
            self.plans.joined(leg.terminal)
        self.table.replan(self.plans.caps)
        self._wakeup.set()

    # --- the task ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the active flows every tick and reshare; reshare soon after any flow wakes
        or leaves. With no flow active it sleeps until one wakes."""
        task_status.started()
        last = next_tick = 0.0
        while True:
            if not self.table.active:  # nothing to sample: sleep until a flow wakes
                await self._wakeup.wait()
                last = trio.current_time()
                next_tick = last + self.link.tick
            with trio.move_on_at(next_tick):
                await self._wakeup.wait()
                await trio.sleep(COALESCE)
            self._wakeup = trio.Event()
            now = trio.current_time()
            ticked = now >= next_tick
            cpu = time.thread_time()
            if ticked:
                self._sample(now, now - last)
                last, next_tick = now, now + self.link.tick
            if ticked or self.table.dirty:
                self._rescale(len(self.table.active))
                self._apply(self.table.reshare())
            if ticked:
                self.totals.ticks += 1
                self.totals.tick_cpu += time.thread_time() - cpu

    def _rescale(self, active: int) -> None:
        """With workers, this worker's part of the link: in proportion to its active legs."""
        if self.slots is None:
            return
        self.slots.publish(active)
        full = self.link.pacing_capacity(self.mtu)
        others = self.slots.others()
        self.table.capacity = full * active / (active + others) if active else full

    def _sample(self, now: float, dt: float) -> None:
        sent = 0
        for flow in list(self.table.active.values()):
            leg = self.legs[flow.fid]
            try:
                info = tcpinfo.read(leg.sock)
            except OSError:
                continue  # closing: close() takes it out
            before = leg.info.bytes_sent if leg.info is not None else 0
            sent += info.bytes_sent - before
            leg.info = info
            if now - leg.fresh_at >= BBR_REFRESH and info.ca_state == TCP_CA_OPEN:
                leg.fresh_at = now  # not in recovery: BBR keeps its recovery cwnd until done
                if restart_congestion(leg.sock, only=b"bbr"):
                    self.totals.congestion_restarts += 1
            self.table.sample(flow.fid, info.bytes_sent, leg.written, info.notsent_bytes, dt)
        self.totals.send_rate = sent / dt if dt > 0 else 0.0

    def _apply(self, caps: dict[int, float]) -> None:
        for fid, cap in caps.items():
            leg = self.legs.get(fid)
            if leg is not None:
                self._set_cap(leg, cap)
        for fid in self.table.active:  # Fast Open children past their first write (LinkLeg)
            leg = self.legs.get(fid)
            if leg is not None and not leg.cappable:
                leg.cappable = True
                self._set_cap(leg, leg.flow.cap)

    @staticmethod
    def _set_cap(leg: LinkLeg, cap: float) -> None:
        """Pace the socket at ``cap`` payload bytes/s, when it may be (LinkLeg.cappable)."""
        if leg.cappable:
            with contextlib.suppress(OSError):  # closing: close() takes it out of the table
                leg.sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, max(1, int(cap)))

    # --- status --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """The link's part of the status document."""
        live = [leg.info for leg in self.legs.values() if leg.info is not None]
        return {
            "interface": self.link.interface,
            "rtt_s": self.link.rtt,
            "egress_bps": self.link.egress_rate,
            "ingress_bps": self.link.ingress_rate,
            "congestion": self.link.congestion,
            "pacing_capacity_bps": round(self.table.capacity * 8),
            "flows": len(self.legs),
            "flows_active": len(self.table.active),
            "flows_total": self.totals.flows,
            "send_rate_bps": round(self.totals.send_rate * 8),
            "bytes_sent": self.totals.bytes_sent + sum(i.bytes_sent for i in live),
            "retransmits": self.totals.retransmits + sum(i.total_retrans for i in live),
            "congestion_restarts": self.totals.congestion_restarts,
            "ticks": self.totals.ticks,
            "tick_cpu_s": round(self.totals.tick_cpu, 6),
            "terminals": self.plans.snapshot(self.legs.values()),
        }
