"""``Every``: at most one log line per ``seconds`` per kind, however often the event happens.

A flood (6,000 SYNs past max_connections, a port scan of the peer listener, a far PEP that is
down) must be counted, and told to the operator, without writing a line per event: the
counter says how many, the line says that it is happening. The listener, the SYN reader and
both ends of [peer] ask ``every(kind)`` before they log.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

__all__ = ["Every"]


class Every:
    """``every(kind)`` is True when the last True for ``kind`` is at least ``seconds`` old
    (always the first time), and then counts as the last."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._last: dict[Hashable, float] = {}

    def __call__(self, kind: Hashable = None) -> bool:
        now = self._clock()
        if now - self._last.get(kind, -math.inf) < self.seconds:
            return False
        self._last[kind] = now
        return True
