"""Whether one more split connection fits in the process's file descriptors (RLIMIT_NOFILE).

Past the limit accept() fails with EMFILE and a redirected client waits in the backlog,
neither served nor refused. The SYN reader asks ``FdBudget.room`` per SYN and lets a flow
through unsplit (end to end) when there is none; the listener's reserve descriptor
(pep.split.listener) covers the flows let through just before the descriptors ran out.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable

__all__ = ["FdBudget", "nofile_limit", "open_fds"]


def nofile_limit() -> int | None:
    """The soft RLIMIT_NOFILE, None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def open_fds() -> int:
    """This process's open descriptors (OSError when even listing them needs one: EMFILE)."""
    return len(os.listdir("/proc/self/fd"))


class FdBudget:
    """While fewer than ``PER_CONNECTION`` descriptors plus a ``RESERVE`` are free, ``room``
    says no. The count is read (``count``) only when it matters (the estimate is within a
    factor of three of the limit) and at most every ``interval`` seconds; SYNs split since the
    last reading count ``PER_CONNECTION`` each. ``limit`` is asked again every second.
    """

    PER_CONNECTION = 6  # two sockets, and a splice pipe (two fds) per direction moving data
    RESERVE = 16  # status and metrics clients, strict mode's upstreams, the accept reserve

    def __init__(
        self,
        interval: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        count: Callable[[], int] = open_fds,
        limit: Callable[[], int | None] = nofile_limit,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._count = count
        self._limit = limit
        self._read_at = -math.inf
        self._used = 0
        self._since = 0
        self.limit: int | None = None
        self._limit_at = -math.inf
        self._read(clock())

    def _estimate(self, factor: int = 1) -> int:
        return self._used * factor + (self._since + 1) * self.PER_CONNECTION + self.RESERVE

    def room(self) -> bool:
        now = self._clock()
        if now - self._limit_at >= 1.0:  # `prlimit --pid` may change it under us
            self._limit_at = now
            self.limit = self._limit()
        if self.limit is not None and self._estimate(3) > self.limit:
            if now - self._read_at >= self.interval:
                self._read(now)
            if self.limit is not None and self._estimate() > self.limit:
                return False
        self._since += 1
        return True

    def _read(self, now: float) -> None:
        self.limit, self._limit_at = self._limit(), now
        try:
            self._used = self._count()
        except OSError:  # EMFILE itself: listing needs a descriptor
            self._used = self.limit or 0
        self._since = 0
        self._read_at = now
