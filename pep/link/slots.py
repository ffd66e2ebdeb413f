"""The workers' shared counts of active link legs: how ``workers = N`` processes share one link
without a coordinator (a memfd the master creates and every worker maps)."""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["SLOTS_ENV", "WorkerSlots"]

SLOTS_ENV = "PEP_LINK_SLOTS"  # the workers' shared counts: "FD" (pep.ops.workers passes it on)
_SLOT = struct.Struct("=q")


class WorkerSlots:
    """How many link legs each worker has active, in memory the workers share (a memfd the
    master creates and passes to every worker it starts). With ``workers = N`` each worker
    shares its own flows, so each takes the part of the link that its active flows are of all
    workers' (read at every reshare: a worker's count is at most a tick old): together they
    still never send faster than the link, and one busy worker is not held to 1/N of it."""

    def __init__(self, fd: int, n: int, index: int | None) -> None:
        self.fd, self.n, self.index = fd, n, index
        self._map = mmap.mmap(fd, _SLOT.size * n)

    @classmethod
    def create(cls, n: int) -> WorkerSlots:
        """The master's: a fresh memfd of ``n`` zero counts, inherited by the workers."""
        fd = os.memfd_create("pep-link-slots")  # close-on-exec: pass_fds hands it on
        os.ftruncate(fd, _SLOT.size * n)
        return cls(fd, n, None)

    @classmethod
    def inherit(cls, spec: str, n: int, index: int) -> WorkerSlots:
        return cls(int(spec), n, index)

    def publish(self, active: int) -> None:
        assert self.index is not None
        _SLOT.pack_into(self._map, self.index * _SLOT.size, active)

    def others(self) -> int:
        return sum(
            _SLOT.unpack_from(self._map, i * _SLOT.size)[0]
            for i in range(self.n)
            if i != self.index
        )

    def reset(self, index: int) -> None:
        """The master's, before (re)starting worker ``index``: a dead worker's count goes."""
        _SLOT.pack_into(self._map, index * _SLOT.size, 0)
