"""When the delay line releases what it holds: the pure scheduling core of pep.lab.delayline.

Arrivals in, batch verdicts out, and no clock of its own: the runner (pep.lab.delayline) feeds
:class:`DelayLine` trio's clock and its timerfd's wake-ups, the unit tests an ideal clock
(:func:`simulate`). :func:`queue_sizing` sizes each direction's kernel queue and netlink buffer
from the link's rates, so the runner binds its queues with nothing left to compute.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["DelayLine", "Lateness", "queue_sizing", "simulate"]

# Per queued packet, the netlink message (META copy: headers and attributes, ~100 bytes) is
# charged to the socket at its skb truesize, about 1 KiB; that is what rcvbuf must hold.
MSG_TRUESIZE = 1024
# Default for an unlimited rate (nothing to size from): DESIGN.md's checked "large" value.
UNSIZED_MAXLEN = 65536


@dataclass(slots=True)
class DelayLine:
    """Which batch verdicts to send when, for one FIFO queue with a constant delay.

    Arrival order is queue order (ids increase), and every packet waits the same ``delay``, so
    release order is arrival order and the packets due at any moment are a prefix of the held
    ones: releasing them is one VERDICT_BATCH naming the last id of that prefix.

    A timer never fires exactly on time: on this project's VMs a wake-up from idle came
    0.2-0.8 ms late, which is 4 % of a 40 ms LEO round trip. So the line learns how late its
    timer fires (``woke``: a moving average, the ``lead``) and aims that much early; the
    packet then leaves on time on average instead of always late. ``slack`` widens each
    batch to packets due that much later (fewer wake-ups, at most ``slack`` early).
    """

    delay: float
    slack: float = 0.0
    lead: float = 0.0
    held: deque[tuple[float, int]] = field(default_factory=deque)
    arrived: int = 0
    released: int = 0
    batches: int = 0
    max_held: int = 0

    LEAD_GAIN: ClassVar[float] = 1 / 16  # moving-average weight of one observed wake-up
    LEAD_MAX: ClassVar[float] = 0.005  # a wake-up later than this is an outlier, not the norm

    def arrive(self, packet_id: int, now: float) -> None:
        self.held.append((now + self.delay, packet_id))
        self.arrived += 1
        if len(self.held) > self.max_held:
            self.max_held = len(self.held)

    def deadline(self) -> float | None:
        """When to wake next (None: nothing held, wait for an arrival)."""
        return self.held[0][0] - self.slack - self.lead if self.held else None

    def woke(self, target: float, now: float) -> None:
        """The timer set for ``target`` fired at ``now``: learn its lateness."""
        late = min(max(now - target, 0.0), self.LEAD_MAX)
        self.lead += (late - self.lead) * self.LEAD_GAIN

    def release(self, now: float) -> int | None:
        """Forget every packet due by ``now``; the id for one batch verdict, or None."""
        held = self.held
        early = self.slack + self.lead
        last = None
        n = 0
        # Same arithmetic as deadline(): waking at the deadline always releases something.
        while held and held[0][0] - early <= now:
            last = held.popleft()[1]
            n += 1
        if last is not None:
            self.released += n
            self.batches += 1
        return last

    def release_all(self) -> int | None:
        """Shutting down: everything goes now (a held packet with no verdict would be lost)."""
        return self.release(math.inf)

    def __len__(self) -> int:
        return len(self.held)


@dataclass(slots=True)
class Lateness:
    """How late (negative: early) the first packet of each batch left, against its due time:
    the delay line's own accuracy, reported in its stats."""

    count: int = 0
    total: float = 0.0
    worst: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.worst = max(self.worst, seconds)

    def as_ms(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"mean_ms": round(mean * 1000, 3), "max_ms": round(self.worst * 1000, 3)}


def simulate(
    arrivals: Iterable[tuple[int, float]], delay: float, slack: float = 0.0
) -> list[tuple[float, int]]:
    """The shell's schedule on an ideal clock: ``(time, batch id)`` for each verdict sent.

    ``arrivals`` are ``(packet id, time)`` in queue order. The shell wakes at each deadline
    and releases what is due; an arrival at the same instant as a wake-up is received first
    (the shell reads the socket before its timer fires when both are ready).
    """
    line = DelayLine(delay, slack)
    out: list[tuple[float, int]] = []
    pending = deque(arrivals)
    while pending or len(line):
        wake = line.deadline()
        if pending and (wake is None or pending[0][1] <= wake):
            packet_id, t = pending.popleft()
            line.arrive(packet_id, t)
            continue
        assert wake is not None
        last = line.release(wake)
        if last is not None:
            out.append((wake, last))
    return out


def queue_sizing(
    rate_bps: int | None,
    reverse_rate_bps: int | None,
    delay_s: float,
    buffer_s: float,
    margin: float = 4.0,
) -> tuple[int, int]:
    """Kernel queue length and netlink receive buffer for one direction's queue.

    What the queue holds at once is bounded by what the senders keep in flight on this
    direction's hop: the data of this direction (rate x (delay + the tbf buffer behind it))
    in packets of one MSS, plus at most one ACK per data packet of the reverse direction.
    ``margin`` covers senders' bursts (an initial window leaves all at once) and small packets.
    With an unlimited rate there is nothing to size from: DESIGN.md's 65536.
    """
    if rate_bps is None or reverse_rate_bps is None:
        maxlen = UNSIZED_MAXLEN
    else:
        span = delay_s + buffer_s
        packets = (rate_bps + reverse_rate_bps) / 8 * span / 1448
        maxlen = min(1 << 20, max(1024, math.ceil(packets * margin)))
    rcvbuf = min(1 << 30, max(4 << 20, maxlen * MSG_TRUESIZE))
    return maxlen, rcvbuf
