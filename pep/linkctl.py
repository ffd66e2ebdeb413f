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

from pep import paths
from pep.checks import ConfigError
from pep.config import LegTuning
from pep.link import Link
from pep.link_routes import LinkRoutes
from pep.linkshare import Sharer

__all__ = ["LinkLegs", "check", "install", "remove", "routes", "show"]

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

    def __init__(self, link: Link | None) -> None:
        self.link: Link | None = None
        self.sharer: Sharer | None = None
        self.configure(link)

    def configure(self, link: Link | None) -> None:
        """Start, or a reload: a new link replaces the old one for new connections; live link
        legs stay in the sharer, which re-shares the new capacity at once."""
        if link is None:
            self.link = None
            return
        index, mtu = check(link)
        if self.sharer is None:
            self.sharer = Sharer(link, index, mtu)
        elif link != self.sharer.link or index != self.sharer.ifindex:
            self.sharer.ifindex = index
            self.sharer.routes.forget()
            self.sharer.resize(link, mtu)
        self.link = link

    def faces(self, host: str) -> bool:
        """Whether the route to ``host`` leaves through the link interface."""
        return self.link is not None and self.sharer is not None and self.sharer.faces_link(host)

    def tuning(self, tuning: LegTuning) -> LegTuning:
        assert self.link is not None
        return link_tuning(tuning, self.link)
