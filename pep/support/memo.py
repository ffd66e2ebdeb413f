"""``Remembered``: a lookup asked of the kernel at most once per key per ``ttl`` seconds.

The per-connection path asks things whose answers change a few times a day at most (is this
address ours? which interface does it route through?): a few syscalls per connection would buy
nothing. Bounded without bookkeeping: past ``size`` keys the memory is dropped whole, so a
flood of new keys costs one lookup each and never grows memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Remembered"]

V = TypeVar("V")


class Remembered(Generic[V]):
    def __init__(
        self,
        fn: Callable[[str], V],
        ttl: float,
        size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fn, self.ttl, self.size, self._clock = fn, ttl, size, clock
        self._known: dict[str, tuple[V, float]] = {}

    def __call__(self, key: str) -> V:
        now = self._clock()
        known = self._known.get(key)
        if known is not None and known[1] > now:
            return known[0]
        if len(self._known) >= self.size:
            self._known.clear()
        value = self.fn(key)
        self._known[key] = (value, now + self.ttl)
        return value

    def forget(self) -> None:
        """The answers changed (pep itself changed them): ask again from now on."""
        self._known.clear()
