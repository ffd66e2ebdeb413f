"""Stand-ins for what the connection path asks of the layers above it (pep.split.hooks): a link
(``LinkSide``) with its legs (``Paced``), and a pool of upstream legs (``UpstreamPool``). Each
records what it was asked, so a unit test of the session, the upstream leg or the relay engine
can check the calls without a sharer, a far PEP or a namespace. The sockets stay real."""

from __future__ import annotations

import dataclasses
import socket

from pep.capture.preconnect import UpstreamError
from pep.config import LegTuning
from pep.split.hooks import NO_LINK, Opened
from pep.split.relay_state import RelayStats
from pep.split.upstream import TCP_FASTOPEN_CONNECT

__all__ = ["FakeLink", "FakePool", "Leg"]


class Leg:
    """A link leg in a sharer (pep.split.hooks.Paced): idle until woken, counting calls."""

    def __init__(
        self, sock: socket.socket | None = None, up: bool = True, far: str | None = None
    ) -> None:
        self.sock, self.up, self.far = sock, up, far
        self.active, self.share, self.woken, self.closed = False, 0.0, 0, 0

    def wake(self) -> None:
        self.active = True
        self.woken += 1

    def close(self) -> None:
        self.closed += 1


class FakeLink:
    """A link (pep.split.hooks.LinkSide) that the routes to ``hosts`` cross; its legs get
    ``congestion``, and each one joined is kept in ``legs`` with the congestion control its
    socket had when it joined."""

    def __init__(self, hosts: set[str], congestion: str = "reno") -> None:
        self.hosts, self.congestion = hosts, congestion
        self.legs: list[Leg] = []
        self.joined_with: list[str] = []  # each joined socket's TCP_CONGESTION
        self.fastopen: list[bool] = []  # and whether it connected with TCP_FASTOPEN_CONNECT
        self.asked: list[str] = []

    def faces(self, host: str) -> bool:
        self.asked.append(host)
        return host in self.hosts

    def tuning(self, tuning: LegTuning, far: str | None = None) -> LegTuning:
        return dataclasses.replace(tuning, congestion=self.congestion)

    def join(self, sock: socket.socket, stats: RelayStats, up: bool, far: str | None = None) -> Leg:
        cc = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        self.joined_with.append(cc.rstrip(b"\0").decode())
        self.fastopen.append(bool(sock.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT)))
        leg = Leg(sock, up, far)
        self.legs.append(leg)
        return leg

    def __getattr__(self, name: str) -> object:
        """The rest of LinkSide (its outages: down, hold, down_time, the watch): a link that
        is always up, as NO_LINK's."""
        return getattr(NO_LINK, name)


class FakePool:
    """A pool of upstream legs (pep.split.hooks.UpstreamPool) for the destinations in
    ``serves_hosts``. Its legs are new loopback connections to ``server`` on which it sends the
    flow's first bytes, as a far PEP's pooled connection carries them; it answers ``via`` as the
    far end's address. ``empty``: it has none to give (the flow goes direct); ``refusal``: the
    far end's destination refused (UpstreamError)."""

    def __init__(
        self,
        server: tuple[str, int],
        serves_hosts: set[str],
        via: str = "192.0.2.1",
        empty: bool = False,
        refusal: str | None = None,
    ) -> None:
        self.server, self.serves_hosts, self.via = server, serves_hosts, via
        self.empty, self.refusal = empty, refusal
        self.opened: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []
        self.done = 0

    def serves(self, host: str) -> bool:
        return host in self.serves_hosts

    async def open(
        self, dst: tuple[str, int], client: tuple[str, int], first: bytes
    ) -> Opened | None:
        self.opened.append((dst, client, first))
        if self.refusal is not None:
            raise UpstreamError(self.refusal)
        if self.empty:
            return None
        sock = socket.create_connection(self.server, timeout=5)
        sock.sendall(first)
        sock.setblocking(False)
        return Opened(sock, self.via, done=self._done)

    def _done(self) -> None:
        self.done += 1
