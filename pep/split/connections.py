"""The live connection table and the cumulative totals that ``pep status`` and metrics read.

Sans-IO: the listener reports each connection's life (``open`` -> ``established`` -> ``close``)
and everything else only reads. Byte totals are kept so that a Prometheus counter stays
monotonic: a connection's bytes count from its live ``RelayStats`` while it runs and move into
``closed_up``/``closed_down`` when it closes, so the sum never goes backwards.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pep.split.hooks import Paced
from pep.split.relay_state import RelayStats, state

__all__ = ["CONNECT_BUCKETS", "Connection", "ConnectionTable", "LatencyHistogram"]

Addr = tuple[str, int]

# Upper bounds, in seconds, for the upstream connect latency histogram: LAN connects take well
# under a millisecond, a GEO satellite hop adds ~600 ms per round trip (DESIGN.md's GEO
# profile), and the default connect_timeout is 10 s.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10)


@dataclass(slots=True)
class LatencyHistogram:
    """Fixed-bucket histogram; ``counts[i]`` counts values <= ``bounds[i]`` (not cumulative),
    the last slot counts the rest (+Inf)."""

    bounds: tuple[float, ...] = CONNECT_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True, eq=False)
class Connection:
    """One connection from accept to close; ``stats`` is the relay's live counters."""

    id: int
    client: Addr
    dst: Addr
    flow: str  # where the SYN reader said it was going ("-" when it had no record)
    started: float  # monotonic
    stats: RelayStats | None = None  # None while the upstream connect is in progress
    connect_seconds: float | None = None
    # The client's and the upstream leg's places in the link's sharer (pep.split.hooks.Paced), for
    # the legs that send into the link; shown by pep status.
    links: tuple[Paced | None, Paced | None] = (None, None)

    @property
    def state(self) -> str:
        """connecting, open, or which side has finished sending (pep.split.relay_state)."""
        s = self.stats
        return state(s is not None, s is not None and s.up_eof, s is not None and s.down_eof)


class ConnectionTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.live: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self.closed = 0  # connections that were relayed and have closed
        self.closed_up = 0  # bytes of closed connections, client -> server
        self.closed_down = 0
        self.failures: Counter[str] = Counter()  # upstream connect failures by reason
        self.connect_latency = LatencyHistogram()

    def __len__(self) -> int:
        return len(self.live)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.live.values()))

    def open(self, client: Addr, dst: Addr, flow: str) -> Connection:
        conn = Connection(next(self._ids), client[:2], dst[:2], flow, self.clock())
        self.live[conn.id] = conn
        return conn

    def established(self, conn: Connection, stats: RelayStats, connect_seconds: float) -> None:
        conn.stats = stats
        conn.connect_seconds = connect_seconds
        self.connect_latency.observe(connect_seconds)

    def close(self, conn: Connection, failure: str | None = None) -> None:
        """Forget a connection; idempotent, so every way out of the handler may call it."""
        if self.live.pop(conn.id, None) is None:
            return
        if failure is not None:
            self.failures[failure] += 1
        if conn.stats is not None:
            self.closed += 1
            self.closed_up += conn.stats.up
            self.closed_down += conn.stats.down

    def bytes_total(self) -> tuple[int, int]:
        """(up, down) relayed so far, live connections included."""
        up, down = self.closed_up, self.closed_down
        for conn in self.live.values():
            if conn.stats is not None:
                up += conn.stats.up
                down += conn.stats.down
        return up, down
