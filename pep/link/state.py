"""Whether the link is up, from what pep already sees of it (sans-IO; pep.link.watch samples).

A satellite link goes away for seconds to minutes (a rain fade) or a fraction of a second (a
LEO handover). pep sees it from its own sockets that cross the link: the link legs and the
[peer] pool's idle connections, whose keepalive probes are a heartbeat across the link (one
every ``Link.heartbeat`` seconds). Two readings of their tcp_info per sample:

- ``heard_ago``: how long since anything arrived on any of them (tcpi_last_data_recv,
  tcpi_last_ack_recv: a keepalive's answer counts), the freshest over all;
- ``stalled``: whether one of them is waiting for an answer that is overdue: two
  retransmission timeouts in a row (tcpi_retransmits >= 2: one is ordinary loss), or two
  keepalive probes unanswered (tcpi_probes >= 2).

The link is *down* when one is stalled and nothing at all has arrived for ``silence`` (three
round trips): a single flow whose far host went away does not take the link down while others
hear from across it. It went down when it was last heard from, and is *up* again at the first
thing heard after that. With nothing waiting for an answer (an idle link and no [peer]), pep
cannot tell and says up: nobody is held up by an outage nobody uses.

Why not a probe of our own: with [peer], the pool's keepalives are one, answered by the far
PEP's kernel at no cost to it; without it, the far end is any server, and the link legs' own
retransmissions are the probes. Either way no new wire format, and the far PEP needs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SLACK", "LinkState", "Outage"]

# How much later than the moment the link went down something must have been heard to count
# as heard since: tcp_info counts milliseconds of jiffies and the samples read trio's clock,
# so the same last packet reads a few ms apart from one sample to the next.
SLACK = 0.05


@dataclass(frozen=True, slots=True)
class Outage:
    """A change of the link's state: down at ``since``, or up at ``until`` after ``lasted``."""

    up: bool
    at: float
    lasted: float = 0.0


class LinkState:
    """The link's state and its history: ``observe`` each sample, get the change if any."""

    def __init__(self, silence: float) -> None:
        self.silence = silence
        self.down_since: float | None = None
        self.outages = 0  # outages so far (a live one counts)
        self.down_seconds = 0.0  # total of the outages that ended
        self.last_change: float | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None

    def down_total(self, now: float) -> float:
        """Seconds the link has been down, the live outage included."""
        live = now - self.down_since if self.down_since is not None else 0.0
        return self.down_seconds + live

    def down_during(self, start: float, now: float) -> float:
        """Of the time from ``start`` to ``now``, how much the live outage took: a wait that
        began before it or during it does not count that part."""
        if self.down_since is None:
            return 0.0
        return max(0.0, now - max(start, self.down_since))

    def observe(self, now: float, heard_ago: float, stalled: bool) -> Outage | None:
        """One sample; the change it makes, or None."""
        heard_at = now - heard_ago if math.isfinite(heard_ago) else -math.inf
        if self.down_since is None:
            if stalled and heard_ago >= self.silence:
                since = heard_at if math.isfinite(heard_at) else now - self.silence
                self.down_since = since
                self.outages += 1
                self.last_change = since
                return Outage(up=False, at=since)
            return None
        if heard_at > self.down_since + SLACK:
            lasted = heard_at - self.down_since
            self.down_seconds += lasted
            self.down_since = None
            self.last_change = heard_at
            return Outage(up=True, at=heard_at, lasted=lasted)
        return None
