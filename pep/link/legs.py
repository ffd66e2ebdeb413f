"""The daemon's side of ``[link]``: the link interface, and which legs cross the link.

- ``check(link)`` at start and on reload: the interface must exist in this namespace (a typo
  would otherwise tune nothing and share nothing, silently). A ConfigError, so ``pep run``
  exits 2 before anything is installed. ``route_metrics(link)``: the initial windows its
  routes get (pep.kernel.link_routes installs them, owned by the process that owns the rules).
- ``LinkLegs``: per process, what a split connection asks (pep.split.hooks.LinkSide): does this
  leg face the link, with which tuning, its place in the Sharer that paces it, and whether the
  link is up (pep.link.watch: how long it has been down, how long to wait for it).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from pep.config import LegTuning
from pep.config.link import Link
from pep.config.schema import ConfigError, Net
from pep.link.pacer import LinkLeg, Sharer
from pep.link.routequery import RouteCache
from pep.link.slots import WorkerSlots
from pep.link.watch import LinkWatch
from pep.split.relay import RelayStats

__all__ = ["LinkLegs", "check", "route_metrics", "terminal_route_metrics"]

log = logging.getLogger(__name__)


def check(link: Link) -> tuple[int, int]:
    """(ifindex, MTU) of the link interface; ConfigError when it does not exist here."""
    try:
        index = socket.if_nametoindex(link.interface)
        mtu = int(Path(f"/sys/class/net/{link.interface}/mtu").read_text())
    except OSError:
        raise ConfigError(
            "link.interface", link.interface, "does not exist in this network namespace"
        ) from None
    return index, mtu


def route_metrics(link: Link) -> dict[int, dict[str, int]]:
    """initcwnd/initrwnd per family for the routes through the link, at its interface's MTU."""
    _, mtu = check(link)
    return {family: link.route_metrics(mtu, family) for family in (4, 6)}


def terminal_route_metrics(link: Link) -> list[tuple[Net, dict[int, dict[str, int]]]]:
    """Each terminal network with its plan's initcwnd/initrwnd per family (the routes to it
    get those instead of the carrier's: pep.kernel.link_routes)."""
    plans = link.plans()
    if not len(plans):
        return []
    _, mtu = check(link)
    out = []
    for terminal in plans:
        plan = link.for_terminal(terminal)
        metrics = {family: plan.route_metrics(mtu, family) for family in (4, 6)}
        out += [(net, metrics) for net in terminal.networks]
    return out


class LinkLegs:
    """One process's view of the link: which legs face it, and the sharer that paces them.

    ``link`` None (no [link] table) makes every question answer "not on the link": pep then
    behaves as it did before [link] existed.
    """

    def __init__(
        self, link: Link | None, slots: WorkerSlots | None = None, routes: RouteCache | None = None
    ) -> None:
        self.link: Link | None = None
        self.sharer: Sharer | None = None
        self.watch: LinkWatch | None = None  # the link's state: up, or down since when
        self._on_change: list[Callable[[bool], None]] = []  # told when the link goes or comes
        # "Which interface does this address route through": asked for the link legs and by
        # the [peer] pool, one cache per process (pep.link.routequery), handed in by the daemon.
        self.routes = routes if routes is not None else RouteCache()
        self.slots = slots  # a worker's view of the other workers' link legs
        self._sharing = trio.Event()  # set once there is a sharer to run
        self.configure(link)

    def configure(self, link: Link | None) -> None:
        """Start, or a reload: a new link replaces the old one for new connections; live link
        legs stay in the sharer, which re-shares the new capacity at once."""
        if link is None:
            self.link = None
            return
        index, mtu = check(link)
        if link != self.link:  # a SIGHUP that changed nothing asks the kernel nothing
            self._warn_unrouted(link, index)
        if self.sharer is None:
            self.sharer = Sharer(link, index, mtu, routes=self.routes, slots=self.slots)
            sharer = self.sharer
            self.watch = LinkWatch(
                link, lambda: (leg.sock for leg in sharer.legs.values()), self._on_change
            )
            self._sharing.set()
        elif link != self.sharer.link or index != self.sharer.ifindex:
            self.sharer.ifindex = index
            self.routes.forget()
            self.sharer.resize(link, mtu)
        assert self.watch is not None
        self.watch.configure(link)
        self.link = link

    def _warn_unrouted(self, link: Link, index: int) -> None:
        """A terminal network whose route does not leave through the link interface is a
        warning, not an error (a route may come up later): its flows are never link legs."""
        # A cache of its own: the connections' (self.routes) is not flushed by thousands of
        # network addresses that no connection asks for.
        probe = RouteCache()
        try:
            stray = [
                f"{t.name} {net}"
                for t in link.plans()
                for net in t.networks
                if probe.oif(str(net.network_address)) != index
            ]
        finally:
            probe.close()
        if stray:
            shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
            log.warning(
                "link %s: %d terminal network(s) not routed through it (no route, or one through "
                "another interface): %s; flows to them are not shared as link legs",
                link.interface,
                len(stray),
                shown,
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sharer's task, once there is a link (at start, or from the reload that adds
        one); until cancelled."""
        task_status.started()
        await self._sharing.wait()
        assert self.sharer is not None and self.watch is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sharer.run)
            nursery.start_soon(self.watch.run)

    def snapshot(self) -> dict[str, object] | None:
        """The link's part of pep status (None without [link])."""
        if self.link is None or self.sharer is None or self.watch is None:
            return None
        return {**self.sharer.snapshot(), "state": self.watch.snapshot(trio.current_time())}

    # --- pep.split.hooks.LinkSide

    def faces(self, host: str) -> bool:
        """Whether the route to ``host`` leaves through the link interface."""
        return self.link is not None and self.sharer is not None and self.sharer.faces_link(host)

    def tuning(self, tuning: LegTuning, far: str | None = None) -> LegTuning:
        """The link's buffers and congestion control; a terminal's leg (``far`` behind it)
        gets buffers from its plan's BDP, not the carrier's."""
        assert self.link is not None
        link = self.link
        if self.sharer is not None and (name := self.sharer.plans.terminal(far)) is not None:
            link = self.sharer.plans.links[name]
        return link.leg_tuning(tuning)

    def join(
        self, sock: socket.socket, stats: RelayStats, up: bool, far: str | None = None
    ) -> LinkLeg | None:
        if self.link is None or self.sharer is None:
            return None
        return self.sharer.open(sock, stats, up, far)

    @property
    def down(self) -> bool:
        return self.watch is not None and self.link is not None and not self.watch.state.up

    def down_time(self) -> float:
        if self.watch is None:
            return 0.0
        return self.watch.state.down_total(trio.current_time())

    @property
    def hold(self) -> float:
        return self.link.outage_timeout if self.link is not None else 0.0

    def watch_socket(self, sock: socket.socket) -> None:
        if self.watch is not None:
            self.watch.watch(sock)

    def unwatch_socket(self, sock: socket.socket) -> None:
        if self.watch is not None:
            self.watch.unwatch(sock)

    def on_change(self, callback: Callable[[bool], None]) -> None:
        self._on_change.append(callback)
