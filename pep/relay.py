"""Moving bytes between the two legs of a split connection, zero-copy with ``os.splice``.

socket -> pipe -> socket keeps the payload in kernel pages: the prototype measured 12.3 Gbit/s
this way against 3.4 with recv/send (DESIGN.md). Each direction is one trio task that
waits on the fds with ``trio.lowlevel.wait_readable/wait_writable``; per fd there is exactly one
reader (its own direction) and one writer (the other direction), which is what trio allows.

Half-close (RFC 9293 section 3.6: a FIN closes one direction only): EOF read from one side
becomes ``shutdown(SHUT_WR)`` on the other once the pipe is drained, and the connection is
closed only when both directions are done. Losing the tail here is PEPsal v2's bug.

An error on one side (RST, timeout) is passed on as an RST to the other side (close with
SO_LINGER 0): a truncated transfer must not look like a clean end to the peer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from dataclasses import dataclass

import trio

from pep.tuning import close_gracefully

__all__ = ["RelayStats", "abort", "relay"]

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031  # include/uapi/linux/fcntl.h (F_LINUX_SPECIFIC_BASE + 7)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(slots=True)
class RelayStats:
    """Live counters of one connection, readable while the relay runs."""

    up: int = 0  # client -> server bytes
    down: int = 0  # server -> client bytes
    close_reason: str = ""
    # The FIN read from one side has been passed on (half-closed), for `pep status`.
    up_eof: bool = False
    down_eof: bool = False


class _PeerError(Exception):
    """One side failed (reset, timeout); the whole connection is reset."""

    def __init__(self, side: str, err: OSError) -> None:
        super().__init__(f"{side} error: {err.strerror or err}")


def abort(sock: trio.socket.SocketType) -> None:
    """Close with an RST (SO_LINGER 0), so the peer sees a failure, not an orderly EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


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

    def get(self, size: int) -> tuple[int, int]:
        free = self._free.get(size)
        if free:
            pipe = free.pop()
        else:
            pipe = _make_pipe(size)  # may raise EMFILE: then nothing is lent
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


def _close_pipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


PIPES = PipePool()  # one per process: pumps of every connection share it


def _make_pipe(size: int) -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Over /proc/sys/fs/pipe-max-size or the per-user pipe budget the default 64 KiB pipe
    # still works, only with more syscalls per byte.
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError as e:
        global _pipe_warned
        if not _pipe_warned:  # once per process: it is a setting to fix, not an event
            _pipe_warned = True
            log.warning(
                "splice pipes stay small (F_SETPIPE_SZ %d: %s): over fs.pipe-max-size, or, "
                "not running as root, over fs.pipe-user-pages-soft (see deploy/pep-sysctl.conf)",
                size,
                e.strerror,
            )
    return r, w


_pipe_warned = False


class _Relay:
    """One connection's two pumps, sharing one cancel scope for idle timeout and failure."""

    __slots__ = ("failure", "idle_timeout", "pipe_size", "scope", "stats")

    def __init__(self, stats: RelayStats, pipe_size: int, idle_timeout: float) -> None:
        self.stats = stats
        self.pipe_size = pipe_size
        self.idle_timeout = idle_timeout
        self.failure: str | None = None
        self.scope = trio.CancelScope()
        if idle_timeout:
            self.scope.deadline = trio.current_time() + idle_timeout

    async def pump(
        self,
        src: trio.socket.SocketType,
        dst: trio.socket.SocketType,
        names: tuple[str, str],
        attr: str,
    ) -> None:
        try:
            await self._pump(src.fileno(), dst, names, attr)
        except _PeerError as e:
            if self.failure is None:
                self.failure = str(e)
            self.scope.cancel()

    async def _pump(
        self, sfd: int, dst: trio.socket.SocketType, names: tuple[str, str], attr: str
    ) -> None:
        dfd, size, stats = dst.fileno(), self.pipe_size, self.stats
        pipe: tuple[int, int] | None = None  # borrowed from PIPES only while data moves
        clean = True  # the borrowed pipe is empty
        try:
            while True:
                if pipe is None:
                    await trio.lowlevel.wait_readable(sfd)
                    try:
                        pipe = PIPES.get(size)
                    except OSError as e:  # out of descriptors: this connection cannot go on
                        raise _PeerError("pep", e) from None
                try:
                    n = os.splice(sfd, pipe[1], size, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    PIPES.put(size, pipe)  # idle again: give the pipe back
                    pipe = None
                    continue
                except OSError as e:
                    raise _PeerError(names[0], e) from None
                if n == 0:
                    break  # EOF, and the pipe is empty: pass the FIN on
                clean, pending = False, n
                while pending:
                    try:
                        pending -= os.splice(pipe[0], dfd, pending, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dfd)
                    except OSError as e:
                        raise _PeerError(names[1], e) from None
                clean = True
                setattr(stats, attr, getattr(stats, attr) + n)
                if self.idle_timeout:
                    self.scope.deadline = trio.current_time() + self.idle_timeout
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:  # the peer already closed both ways
                    raise _PeerError(names[1], e) from None
            setattr(stats, attr + "_eof", True)
        finally:
            if pipe is not None:
                if clean:
                    PIPES.put(size, pipe)
                else:
                    PIPES.discard(pipe)


async def relay(
    client: trio.socket.SocketType,
    upstream: trio.socket.SocketType,
    stats: RelayStats,
    *,
    pipe_size: int = 1 << 20,
    idle_timeout: float = 0,
) -> None:
    """Relay until both directions reach EOF, one side fails, or the connection idles out.

    Always closes both sockets: with FIN after two clean EOFs or an idle timeout, with an RST
    to both when one side failed or the relay was cancelled (daemon stopping), because the
    peers must not take a cut-off transfer for a complete one.
    """
    r = _Relay(stats, pipe_size, idle_timeout)
    clean = False
    try:
        with r.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(r.pump, client, upstream, ("client", "upstream"), "up")
                nursery.start_soon(r.pump, upstream, client, ("upstream", "client"), "down")
        if r.failure is not None:
            stats.close_reason = r.failure
        elif r.scope.cancelled_caught:
            stats.close_reason = "idle timeout"
            clean = True
        else:
            stats.close_reason = "eof"
            clean = True
    finally:
        if clean:
            close_gracefully(client, upstream)  # FIN after the data (see Listener.handle)
        else:
            stats.close_reason = stats.close_reason or "cancelled"
            abort(client)
            abort(upstream)
