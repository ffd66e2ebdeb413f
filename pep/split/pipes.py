"""The splice pipes the relay engine (pep.split.relay) moves bytes through, pooled per process.

A pipe is borrowed by one direction of one connection only while bytes are moving, and given
back when it is empty; the pool keeps some for reuse. This is the one place that creates,
sizes and closes pipes; the engine (``Relayer``) holds the process's pool.
"""

from __future__ import annotations

import fcntl
import logging
import os

from pep.support.errors import describe

__all__ = ["PipePool"]

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031  # include/uapi/linux/fcntl.h (F_LINUX_SPECIFIC_BASE + 7)


class PipePool:
    """Splice pipes lent to pumps only while data is moving, kept for reuse when returned.

    A pipe costs two fds and up to ``size`` bytes of kernel memory; an idle connection holds
    none (two socket fds in all, against six with a pipe per direction: 10,000 idle
    connections fit a 20,000-fd limit). Reuse also saves the pipe2 + F_SETPIPE_SZ syscalls per
    burst. A returned pipe must be empty; one that may still hold bytes (its relay failed
    mid-way) is closed instead.
    """

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep  # idle pipes kept per size; more are closed
        self._free: dict[int, list[tuple[int, int]]] = {}
        self.created = 0
        self.lent = 0
        self.small = False  # F_SETPIPE_SZ was refused: warned once, a setting to fix

    def get(self, size: int) -> tuple[int, int]:
        free = self._free.get(size)
        if free:
            pipe = free.pop()
        else:
            pipe = self._make(size)  # may raise EMFILE: then nothing is lent
            self.created += 1
        self.lent += 1
        return pipe

    def put(self, size: int, pipe: tuple[int, int]) -> None:
        self.lent -= 1
        free = self._free.setdefault(size, [])
        if len(free) < self.keep:
            free.append(pipe)
        else:
            _close_pipe(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        self.lent -= 1
        _close_pipe(pipe)

    def idle(self) -> int:
        return sum(len(free) for free in self._free.values())

    def _make(self, size: int) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Over /proc/sys/fs/pipe-max-size or the per-user pipe budget the default 64 KiB pipe
        # still works, only with more syscalls per byte.
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
        except OSError as e:
            if not self.small:
                self.small = True
                log.warning(
                    "splice pipes stay small (F_SETPIPE_SZ %d: %s): over fs.pipe-max-size, or, "
                    "not running as root, over fs.pipe-user-pages-soft "
                    "(see deploy/pep-sysctl.conf)",
                    size,
                    describe(e),
                )
        return r, w


def _close_pipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])
