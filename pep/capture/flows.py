"""The flow table: what the SYN reader learnt about a connection, until the listener accepts it.

Keyed by the client's (address, port). Entries are short-lived (the gap between the SYN and
accept()), the table is bounded (a SYN flood must not grow memory), and a new SYN for the same
key replaces the old entry: PEPsal v1 kept the stale one and blocked the port for hours.

A plain dict keeps insertion order, and re-inserting a key moves it to the end, so the oldest
entry is always first: expiry and eviction pop from the front in O(1) amortised.

A flow dropped unclaimed (expired, evicted, replaced, cleared) is handed to ``on_drop``: in
strict mode it may carry an open upstream socket, which its owner (pep.capture.preconnect) closes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from pep.capture.syn import SynInfo

__all__ = ["Flow", "FlowTable"]

Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Flow:
    syn: SynInfo
    seen: float  # monotonic time of the SYN
    # Strict mode: the upstream connection pep opened before letting the SYN through
    # (pep.capture.preconnect); the session that claims the flow adopts it.
    upstream: socket.socket | None = None

    @property
    def original_dst(self) -> tuple[str, int]:
        return (self.syn.dst, self.syn.dport)


class FlowTable:
    def __init__(
        self,
        max_size: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[Flow], None] | None = None,
    ) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self._clock = clock
        self._on_drop = on_drop
        self._flows: dict[Key, Flow] = {}
        self.evicted = 0  # dropped because the table was full (a SYN flood, or a slow listener)
        self.expired = 0  # never claimed within ttl (SYN that never completed the handshake)

    def __len__(self) -> int:
        return len(self._flows)

    def record(self, syn: SynInfo, upstream: socket.socket | None = None) -> None:
        now = self._clock()
        key = (syn.src, syn.sport)
        old = self._flows.pop(key, None)  # re-insert at the end: a new SYN replaces the old
        if old is not None:
            self._drop(old)
        self._flows[key] = Flow(syn, now, upstream)
        self._expire(now)
        while len(self._flows) > self.max_size:
            self._drop(self._flows.pop(next(iter(self._flows))))
            self.evicted += 1

    def claim(self, client: Key) -> Flow | None:
        """Remove and return the flow for an accepted connection (each SYN is used once)."""
        flow = self._flows.pop(client, None)
        if flow is not None and self._clock() - flow.seen > self.ttl:
            self._drop(flow)
            self.expired += 1
            return None
        return flow

    def _expire(self, now: float) -> None:
        flows = self._flows
        while flows:
            key = next(iter(flows))
            if now - flows[key].seen <= self.ttl:
                break
            self._drop(flows.pop(key))
            self.expired += 1

    def clear(self) -> None:
        """Drop everything (the daemon is stopping)."""
        while self._flows:
            self._drop(self._flows.popitem()[1])

    def _drop(self, flow: Flow) -> None:
        if self._on_drop is not None:
            self._on_drop(flow)
