"""The daemon's side of ``[link]``: the interface, its routes' initial windows, the link legs.

- ``check(link)`` at start and on reload: the interface must exist in this namespace (a typo
  would otherwise tune nothing and share nothing, silently). A ConfigError, so ``pep run``
  exits 2 before anything is installed.
- ``install(link)`` / ``remove()``: the route metrics (pep.link_routes), kernel state owned by
  the process that owns the rules (the single daemon, or a workers' master); ``remove`` is a
  step of pep.kernel_state, so shutdown and ``pep rules remove`` restore the routes, also
  after a crash.
- ``LinkLegs``: per process, what a split connection asks: does this leg face the link, and
  with which tuning; the Sharer for its pacing.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import trio

from pep import paths
from pep.checks import ConfigError
from pep.config import Config, LegTuning
from pep.link import Link
from pep.link_routes import LinkRoutes
from pep.linkshare import Sharer, WorkerSlots
from pep.routequery import RouteCache

__all__ = ["LinkLegs", "check", "install", "listener_tuning", "remove", "routes", "show"]

STATE_FILE = "link-routes.json"


def routes() -> LinkRoutes:
    """pep's route changes in this namespace, with their recovery file."""
    return LinkRoutes(Path(paths.runtime_dir()) / STATE_FILE)


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


def install(link: Link) -> None:
    """Initial windows on every route through the link (replacing an earlier run's)."""
    _, mtu = check(link)
    metrics = {family: link.route_metrics(mtu, family) for family in (4, 6)}
    routes().apply(link.interface, metrics)


def remove() -> int:
    """Put back the routes pep changed (a pep.kernel_state step)."""
    return routes().restore()


def show() -> list[str]:
    return routes().show()


def arrives_on_link(cfg: Config) -> bool:
    """Whether connections arrive on the link interface (it is one of the ingress
    interfaces, by name or by an iptables "+" wildcard): then accepted sockets are link legs."""
    if cfg.link is None:
        return False
    name = cfg.link.interface
    return any(i == name or (i.endswith("+") and name.startswith(i[:-1])) for i in cfg.interfaces)


def listener_tuning(cfg: Config) -> LegTuning:
    """The listening sockets' options. Accepted sockets inherit the buffers, and the receive
    buffer in place when the SYN arrives caps the initial window the SYN-ACK offers (with
    initrwnd): so when connections arrive on the link, the link's buffers go on the listener.
    Congestion control is set per accepted link leg (pep.session), not inherited by all."""
    if not arrives_on_link(cfg):
        return cfg.client
    assert cfg.link is not None
    link = link_tuning(cfg.client, cfg.link)
    return dataclasses.replace(cfg.client, sndbuf=link.sndbuf, rcvbuf=link.rcvbuf)


def link_tuning(tuning: LegTuning, link: Link) -> LegTuning:
    """A link leg's tuning: what the leg's own table sets, else the link's BDP-sized buffers
    and congestion control."""
    return dataclasses.replace(
        tuning,
        sndbuf=tuning.sndbuf if tuning.sndbuf is not None else link.sndbuf,
        rcvbuf=tuning.rcvbuf if tuning.rcvbuf is not None else link.rcvbuf,
        congestion=tuning.congestion if tuning.congestion is not None else link.congestion,
    )


class LinkLegs:
    """One process's view of the link: which legs face it, and the sharer that paces them.

    ``link`` None (no [link] table) makes every question answer "not on the link": pep then
    behaves as it did before [link] existed.
    """

    def __init__(self, link: Link | None, slots: WorkerSlots | None = None) -> None:
        self.link: Link | None = None
        self.sharer: Sharer | None = None
        # "Which interface does this address route through": asked for the link legs and by
        # the [peer] pool, one cache per process (pep.routequery).
        self.routes = RouteCache()
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
        if self.sharer is None:
            self.sharer = Sharer(link, index, mtu, routes=self.routes, slots=self.slots)
            self._sharing.set()
        elif link != self.sharer.link or index != self.sharer.ifindex:
            self.sharer.ifindex = index
            self.routes.forget()
            self.sharer.resize(link, mtu)
        self.link = link

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sharer's task, once there is a link (at start, or from the reload that adds
        one); until cancelled."""
        task_status.started()
        await self._sharing.wait()
        assert self.sharer is not None
        await self.sharer.run()

    def snapshot(self) -> dict[str, object] | None:
        """The link's part of pep status (None without [link])."""
        if self.link is None or self.sharer is None:
            return None
        return self.sharer.snapshot()

    def faces(self, host: str) -> bool:
        """Whether the route to ``host`` leaves through the link interface."""
        return self.link is not None and self.sharer is not None and self.sharer.faces_link(host)

    def tuning(self, tuning: LegTuning) -> LegTuning:
        assert self.link is not None
        return link_tuning(tuning, self.link)
