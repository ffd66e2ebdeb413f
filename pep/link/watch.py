"""The IO shell of the link's state (pep.link.state decides): which sockets cross the link, their
tcp_info sampled every ``interval``, one log line at each change, and callbacks for those that
act on it (the [peer] pool retries at once when the link is back).

The sockets: the link legs in the sharer (``legs``, read when sampled) and the ones registered
with ``watch`` (the pool's idle pooled connections, whose keepalive probes are the heartbeat).
A sample stops at the first socket that settles it: while the link is up, one that heard from
across it within ``silence``; while it is down, one that heard anything since it went down. So
with traffic flowing a sample costs one getsockopt, not one per connection.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
from collections.abc import Callable, Iterable

import trio

from pep.config.link import Link
from pep.link import tcpinfo
from pep.link.state import SLACK, LinkState, Outage

__all__ = ["LinkWatch", "evidence"]

log = logging.getLogger(__name__)

# Retransmission timeouts, or keepalive probes, unanswered in a row before a socket counts as
# waiting in vain: one RTO is ordinary loss (or a spurious timeout), two are not.
STALLED = 2


def evidence(info: tcpinfo.TcpInfo) -> tuple[float, bool]:
    """(seconds since anything arrived, waiting in vain) of one socket."""
    heard = min(info.last_data_recv_ms, info.last_ack_recv_ms) / 1000
    return heard, info.retransmits >= STALLED or info.probes >= STALLED


class LinkWatch:
    def __init__(
        self,
        link: Link,
        legs: Callable[[], Iterable[socket.socket]],
        on_change: list[Callable[[bool], None]] | None = None,
    ) -> None:
        self.link = link
        self.state = LinkState(link.silence)
        self._legs = legs
        self._watched: set[socket.socket] = set()
        # Called with True when the link comes back, False when it goes (the list is the
        # owner's: callbacks added to it later are called too).
        self._on_change = on_change if on_change is not None else []
        self.samples = 0

    @property
    def interval(self) -> float:
        """A third of the RTT, between 0.1 and 0.5 s: the state follows within a fraction of
        a round trip, and an idle gateway wakes a few times a second for it."""
        return min(0.5, max(0.1, self.link.rtt / 3))

    def configure(self, link: Link) -> None:
        """A reloaded [link]: its new RTT sets the silence from now on."""
        self.link = link
        self.state.silence = link.silence

    def watch(self, sock: socket.socket) -> None:
        self._watched.add(sock)

    def unwatch(self, sock: socket.socket) -> None:
        self._watched.discard(sock)

    def sample(self, now: float) -> Outage | None:
        """Read the sockets until one settles it; feed the state; act on a change."""
        self.samples += 1
        state = self.state
        heard, stalled = math.inf, False
        # Lazily: the first socket that heard from the far side lately settles it.
        for sock in itertools.chain(self._watched, self._legs()):
            try:
                ago, waiting = evidence(tcpinfo.read(sock))
            except OSError:
                continue  # closing: its owner takes it out
            heard, stalled = min(heard, ago), stalled or waiting
            if state.up and ago < state.silence:
                break  # something crossed the link lately: up, whatever the rest say
            if (
                not state.up
                and state.down_since is not None
                and now - ago > state.down_since + SLACK
            ):
                break  # heard since it went down: up again
        change = state.observe(now, heard, stalled)
        if change is not None:
            self._changed(change)
        return change

    def _changed(self, change: Outage) -> None:
        name = self.link.interface
        if change.up:
            log.warning(
                "link %s: up again after %.1f s down (outage %d; %.1f s down in all)",
                name, change.lasted, self.state.outages, self.state.down_seconds,
            )  # fmt: skip
        else:
            log.warning(
                "link %s: down (nothing heard across it for %.1f s while waiting for an "
                "answer); connections are held for up to %g s (outage_timeout)",
                name, trio.current_time() - change.at, self.link.outage_timeout,
            )  # fmt: skip
        for callback in self._on_change:
            callback(change.up)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.sample(trio.current_time())

    def snapshot(self, now: float) -> dict[str, object]:
        s = self.state
        return {
            "up": s.up,
            "down_for_s": None if s.down_since is None else round(now - s.down_since, 3),
            "outages": s.outages,
            "outage_seconds": round(s.down_total(now), 3),
        }
