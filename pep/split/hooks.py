"""What the connection path asks of the layers built on it, as protocols the daemon wires in.

The split connection path (listener, session, upstream, relay) sits below the link
(pep.link) and the PEP-to-PEP pool (pep.peer): those build on it, so it cannot import them.
Where it needs them, it names here what it needs, and pep.ops.daemon hands in the real ones:

- ``LinkSide``: does a leg's socket face the satellite link, with which tuning, and its place
  in the link's sharer (pep.link.legs.LinkLegs; ``NO_LINK`` without ``[link]``);
- ``Paced``: one link leg in the sharer, as the relay engine and ``pep status`` see it
  (pep.link.pacer.LinkLeg): three things, and a number to show;
- ``UpstreamPool``: upstream legs opened ahead of time, tried before the direct connect for
  the destinations it serves (pep.peer.pool.PeerPool: pooled connections to the far PEP).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from pep.config import LegTuning

if TYPE_CHECKING:
    from pep.split.relay_state import RelayStats

__all__ = ["NO_LINK", "LinkSide", "Opened", "Paced", "UpstreamPool", "patiently"]

T = TypeVar("T")


class Paced(Protocol):
    """A link leg in the link's sharer."""

    @property
    def active(self) -> bool:
        """Whether it has its share now; an idle leg is woken before pep writes into it."""
        ...

    @property
    def share(self) -> float:
        """Its pacing cap, payload bytes/s (for pep status)."""
        ...

    def wake(self) -> None:
        """pep is about to write into it after an idle spell: it takes its share now."""

    def close(self) -> None:
        """Its connection is done (called before the socket closes): its share goes back."""


class LinkSide(Protocol):
    """The link as the connection path sees it."""

    def faces(self, host: str) -> bool:
        """Whether the route to ``host`` leaves through the link interface."""
        ...

    def tuning(self, tuning: LegTuning, far: str | None = None) -> LegTuning:
        """A link leg's tuning: ``tuning`` with the link's buffers and congestion control
        (``far``: the address across the link, whose terminal's plan sizes the buffers)."""
        ...

    def join(
        self, sock: socket.socket, stats: RelayStats, up: bool, far: str | None = None
    ) -> Paced | None:
        """Enter a link-leg socket in the sharer (None: no sharing to join); ``far``: the
        address across the link (the client of a connection that arrived on it, the
        destination of one routed into it), whose terminal's plan it shares."""
        ...

    # The link's outages (pep.link.watch): a wait for an answer across the link does not count
    # the time the link is down, up to ``hold`` (its outage_timeout).

    @property
    def down(self) -> bool:
        """Whether the link is down now."""
        ...

    def down_time(self) -> float:
        """Seconds the link has been down so far, the live outage included."""
        ...

    @property
    def hold(self) -> float:
        """How long a connection waits for the link to come back, seconds."""
        ...

    def watch_socket(self, sock: socket.socket) -> None:
        """A socket across the link that is no link leg (a pooled idle connection): its
        answers, or their absence, tell the link's state too."""

    def unwatch_socket(self, sock: socket.socket) -> None: ...

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """``callback(up)`` at each change of the link's state."""


class _NoLink:
    """No ``[link]``: no leg faces a link."""

    def faces(self, host: str) -> bool:
        return False

    def tuning(self, tuning: LegTuning, far: str | None = None) -> LegTuning:
        return tuning

    def join(
        self, sock: socket.socket, stats: RelayStats, up: bool, far: str | None = None
    ) -> Paced | None:
        return None

    down = False
    hold = 0.0

    def down_time(self) -> float:
        return 0.0

    def watch_socket(self, sock: socket.socket) -> None:
        pass

    def unwatch_socket(self, sock: socket.socket) -> None:
        pass

    def on_change(self, callback: Callable[[bool], None]) -> None:
        pass


NO_LINK: LinkSide = _NoLink()


async def patiently(wait: Callable[[], Awaitable[T]], timeout: float, link: LinkSide) -> T:
    """``await wait()``, given ``timeout`` seconds of the link being up: the time the link is
    down meanwhile does not count, up to ``link.hold`` in all (trio.TooSlowError after that).
    ``wait`` is awaited again after each deadline, so it must be safe to restart (waiting for
    a socket to become readable or writable is). Without a link: ``timeout``, as
    trio.fail_after would."""
    start = trio.current_time()
    down0 = link.down_time()
    end = start + max(timeout, link.hold)  # never later than this
    deadline = start + timeout
    while True:
        with trio.move_on_at(deadline):
            return await wait()
        now = trio.current_time()
        if link.down:
            deadline = min(end, now + _RECHECK)  # down now: look again soon
        else:
            deadline = min(end, start + timeout + link.down_time() - down0)
        if deadline <= now:
            raise trio.TooSlowError


_RECHECK = 1.0  # seconds between looks at a link that is down, while a wait is held


@dataclass(slots=True)
class Opened:
    """An upstream leg: the socket, the address it goes to (for the link: the far PEP's when a
    pool gave it), the client's first bytes its SYN or its pool's header carried, and what to
    call once its relay is over (None: nothing)."""

    sock: socket.socket
    via: str
    first: int = 0
    done: Callable[[], None] | None = None


class UpstreamPool(Protocol):
    """Upstream legs opened ahead of time (pep.peer.pool.PeerPool)."""

    def serves(self, host: str) -> bool:
        """Whether flows to ``host`` may take this route (it then gets their first bytes)."""
        ...

    async def open(
        self, dst: tuple[str, int], client: tuple[str, int], first: bytes
    ) -> Opened | None:
        """The upstream leg for one flow, ``first`` (the client's first bytes, peeked) already
        sent on it; None when the pool has none to give (the flow goes direct, counted by the
        pool). Raises pep.capture.preconnect.UpstreamError when the far side refused."""
        ...
