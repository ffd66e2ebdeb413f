"""Moving bytes between the two legs of every split connection, zero-copy with ``os.splice``.

socket -> pipe -> socket keeps the payload in kernel pages: the prototype measured 12.3 Gbit/s
this way against 3.4 with recv/send (DESIGN.md). The pipes are lent by the engine's pool
(pep.split.pipes.PipePool) only while bytes are moving.

One engine per process, ``Relayer``, moves the bytes of all its connections: one
level-triggered epoll set, read by one trio task, in which each socket is registered once.
A trio task per direction per connection cost more than a short connection's bytes (three
tasks, a nursery and an epoll_ctl per wait; docs/BENCHMARKS.md); HAProxy and nginx relay the
same way. Each connection's own task (the session, pep.split.session) still owns its
sockets, its idle timeout (a cancel scope whose deadline the engine moves on activity) and the
close: it waits in ``Relayer.relay`` until the engine reports the connection done.

Half-close (RFC 9293 section 3.6: a FIN closes one direction only): EOF read from one side
becomes ``shutdown(SHUT_WR)`` on the other once the pipe is drained, and the connection is
closed only when both directions are done. Losing the tail here is PEPsal v2's bug.

An error on one side (RST, timeout) is passed on as an RST to the other side (close with
SO_LINGER 0): a truncated transfer must not look like a clean end to the peer. The states,
what each socket is polled for and how each ending closes are tables in
pep.split.relay_state.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket

import trio

from pep.split.hooks import Paced
from pep.split.lifecycle import abort, close_gracefully
from pep.split.pipes import PipePool
from pep.split.relay_state import IN as _IN
from pep.split.relay_state import OUT as _OUT
from pep.split.relay_state import RelayStats, ending, interest
from pep.support.errors import describe

# RelayStats lives with the states (pep.split.relay_state); named here too, as the engine's report.
__all__ = ["RelayStats", "Relayer"]

log = logging.getLogger(__name__)

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_ERR = select.EPOLLERR | select.EPOLLHUP  # always reported, whatever the registered mask
_PARKED = -1  # an fd's mask while it is out of the epoll set (see _Conn.ready)
_BATCH = 256  # events handled per wake-up before other tasks get a turn
_BULK = 64 * 1024  # a chunk larger than this is a bulk transfer's: read on at once ...
_BULK_CHUNKS = 4  # ... up to this many chunks per readiness report


class _Pump:
    """One direction, src -> pipe -> dst. ``pending`` bytes wait in the pipe for dst to take
    them; while any do, src is not read (the pipe is the only buffer: bounded)."""

    __slots__ = ("dst", "dst_name", "eof", "leg", "pending", "pipe", "src", "src_name", "up")

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        names: tuple[str, str],
        up: bool,
        leg: Paced | None,
    ) -> None:
        self.src, self.dst = src, dst
        self.src_name, self.dst_name = names
        self.up = up
        self.pipe: tuple[int, int] | None = None  # borrowed from the pool only while data moves
        self.pending = 0
        self.eof = False
        # dst's place in the link's sharer (pep.split.hooks.Paced) when dst sends into the link:
        # woken before the first byte after an idle spell, so that byte already has its share.
        self.leg = leg


class _Conn:
    """One connection's state in the engine: its two pumps and the epoll mask of each fd."""

    __slots__ = (
        "cfd",
        "done",
        "down",
        "failure",
        "finished",
        "idle_timeout",
        "masks",
        "moved_at",
        "pipe_size",
        "pipes",
        "pumps",
        "relayer",
        "scope",
        "stats",
        "ufd",
        "up",
    )

    def __init__(
        self,
        relayer: Relayer,
        client: socket.socket,
        upstream: socket.socket,
        stats: RelayStats,
        pipe_size: int,
        idle_timeout: float,
        links: tuple[Paced | None, Paced | None] = (None, None),
    ) -> None:
        self.relayer = relayer
        self.pipes = relayer.pipes
        self.cfd, self.ufd = client.fileno(), upstream.fileno()
        link_client, link_upstream = links
        self.up = _Pump(client, upstream, ("client", "upstream"), True, link_upstream)
        self.down = _Pump(upstream, client, ("upstream", "client"), False, link_client)
        # fd -> (the pump reading it, the pump writing it)
        self.pumps = {self.cfd: (self.up, self.down), self.ufd: (self.down, self.up)}
        self.masks = {self.cfd: _IN, self.ufd: _IN}
        self.stats = stats
        self.pipe_size = pipe_size
        self.idle_timeout = idle_timeout
        self.moved_at = trio.current_time()
        self.scope = trio.CancelScope()
        if idle_timeout:
            self.scope.deadline = self.moved_at + idle_timeout
        self.done = trio.Event()
        self.failure: str | None = None
        self.finished = False

    def ready(self, fd: int, ev: int) -> None:
        reading, writing = self.pumps[fd]
        handled = False
        if writing.pending and ev & (_OUT | _ERR):
            self._flush(writing)
            handled = True
        if not self.finished and not reading.eof and not reading.pending and ev & (_IN | _ERR):
            self._read(reading)
            handled = True
        if not handled and not self.finished and ev & _ERR:
            if reading.pending and not ev & select.EPOLLERR:
                # Hung up (its FIN read while ours was sent) with data still to read once
                # the other side drains the pipe. No mask silences EPOLLHUP: out of the
                # set until then, or the engine would spin on it.
                self._set_mask(fd, _PARKED)
                return
            # Nothing to read or write on it, yet it failed (an RST after its FIN): the
            # other direction could never be delivered, so the connection ends now.
            err = reading.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
            self._fail(reading.src_name, OSError(err, os.strerror(err)))

    def _read(self, p: _Pump) -> None:
        """Move what src has to dst; a chunk of a bulk transfer (over ``_BULK``) is followed
        at once by the next, up to ``_BULK_CHUNKS``, saving a trip through both event loops
        per chunk; a short exchange never pays for the extra read."""
        for _ in range(_BULK_CHUNKS):
            if p.pipe is None:
                try:
                    p.pipe = self.pipes.get(self.pipe_size)
                except OSError as e:  # out of descriptors: this connection cannot go on
                    self._fail("pep", e)
                    return
            try:
                n = os.splice(p.src.fileno(), p.pipe[1], self.pipe_size, flags=_SPLICE_FLAGS)
            except BlockingIOError:  # drained (or a stale readiness report)
                self.pipes.put(self.pipe_size, p.pipe)
                p.pipe = None
                return
            except OSError as e:
                self._fail(p.src_name, e)
                return
            if n == 0:  # EOF, and the pipe is empty: pass the FIN on
                self.pipes.put(self.pipe_size, p.pipe)
                p.pipe = None
                self._eof(p)
                return
            p.pending = n
            if p.leg is not None and not p.leg.active:
                p.leg.wake()
            self._flush(p)
            if p.pending or self.finished or n <= _BULK:
                return

    def _flush(self, p: _Pump) -> None:
        assert p.pipe is not None
        mask = self.masks[p.dst.fileno()]
        blocked = mask != _PARKED and mask & _OUT  # dst was full at the last try
        try:
            while p.pending:
                n = os.splice(p.pipe[0], p.dst.fileno(), p.pending, flags=_SPLICE_FLAGS)
                p.pending -= n
                if p.up:
                    self.stats.up += n
                else:
                    self.stats.down += n
        except BlockingIOError:
            if not blocked:  # dst is full: wait for it to drain, stop reading src meanwhile
                self._sync(p)
            if self.idle_timeout:
                self._moved()
            return
        except OSError as e:
            self._fail(p.dst_name, e)
            return
        if self.idle_timeout:
            self._moved()
        self.pipes.put(self.pipe_size, p.pipe)
        p.pipe = None
        if blocked:
            self._sync(p)

    def _moved(self) -> None:
        """Push the idle deadline on, at most every tenth of the timeout (a deadline change
        is a heap operation in trio's scheduler; a chunk moved is not worth one)."""
        now = self.relayer.now
        if now - self.moved_at >= min(1.0, self.idle_timeout / 10):
            self.moved_at = now
            self.scope.deadline = now + self.idle_timeout

    def _eof(self, p: _Pump) -> None:
        p.eof = True
        try:
            p.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:  # the peer already closed both ways
                self._fail(p.dst_name, e)
                return
        if p.up:
            self.stats.up_eof = True
        else:
            self.stats.down_eof = True
        if self.up.eof and self.down.eof:
            self.finish(None)
        else:
            self._sync(p)

    def _want(self, fd: int) -> int:
        reading, writing = self.pumps[fd]
        return interest(reading.eof, reading.pending, writing.pending)

    def _sync(self, p: _Pump) -> None:
        """Register what each of the pump's fds now waits for (one epoll_ctl per change)."""
        for sock in (p.src, p.dst):
            fd = sock.fileno()
            want = self._want(fd)
            if want != self.masks[fd]:
                self._set_mask(fd, want)

    def _set_mask(self, fd: int, mask: int) -> None:
        self.relayer.modify(fd, self.masks[fd], mask)
        self.masks[fd] = mask

    def _fail(self, side: str, err: OSError) -> None:
        self.finish(f"{side} error: {describe(err)}")

    def finish(self, failure: str | None) -> None:
        """Out of the engine, closed, and the connection's task woken to account for it.

        Closed here rather than by the task: closing takes the sockets out of the epoll set,
        so no stale readiness is reported for them in between, and no unregistering is needed.
        """
        if self.finished:
            return
        self.finished = True
        self.failure = failure
        self.close(clean=failure is None)
        self.done.set()

    def close(self, clean: bool) -> None:
        """FIN after the data on a clean end, RST to both otherwise (pep.split.lifecycle)."""
        self.relayer.forget(self)
        self.release()
        for p in (self.up, self.down):
            if p.leg is not None:  # out of the link's sharer while tcp_info is still readable
                p.leg.close()
        client, upstream = self.up.src, self.down.src
        if clean:
            close_gracefully(client, upstream)
        else:
            abort(client)
            abort(upstream)

    def release(self) -> None:
        """Give back the pipes: empty ones to the pool, ones that may hold bytes closed."""
        for p in (self.up, self.down):
            if p.pipe is not None:
                if p.pending:
                    self.pipes.discard(p.pipe)
                else:
                    self.pipes.put(self.pipe_size, p.pipe)
                p.pipe = None


class Relayer:
    """The relay engine of one process; ``run`` must be running while ``relay`` is used."""

    def __init__(self, pipes: PipePool | None = None) -> None:
        # The splice pipes of every connection of this engine (one engine, one pool, per
        # process); handed in so that a test can see what is lent.
        self.pipes = pipes if pipes is not None else PipePool()
        self._ep = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self.now = 0.0  # trio.current_time() at the start of the batch being handled
        self.running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handle every ready socket, until cancelled (which only the connections' owner
        does: every relay is then cancelled with it and resets its sockets). Started with
        ``nursery.start``, so no connection can reach ``relay`` before the engine runs."""
        self.running = True
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self._ep.fileno())
                self.now = trio.current_time()
                for fd, ev in self._ep.poll(0, _BATCH):
                    conn = self._conns.get(fd)
                    if conn is None:
                        continue  # finished earlier in this batch
                    try:
                        conn.ready(fd, ev)
                    except Exception:  # a bug costs its own connection, not every one
                        log.exception("relay failed; connection reset")
                        conn.finish("pep error")
        finally:
            self.running = False
            trio.lowlevel.notify_closing(self._ep.fileno())
            self._ep.close()  # relays still finishing find it closed: see forget

    async def relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        stats: RelayStats,
        *,
        pipe_size: int = 1 << 20,
        idle_timeout: float = 0,
        links: tuple[Paced | None, Paced | None] = (None, None),
    ) -> None:
        """Relay until both directions reach EOF, one side fails, or the connection idles out.
        ``links``: the client's and the upstream socket's places in the link's sharer, for the
        legs that send into the link.

        Always closes both sockets: with FIN after two clean EOFs or an idle timeout, with an
        RST to both when one side failed or the relay was cancelled (daemon stopping), because
        the peers must not take a cut-off transfer for a complete one.
        """
        if not self.running:
            raise RuntimeError("Relayer.run is not running")
        conn = _Conn(self, client, upstream, stats, pipe_size, idle_timeout, links)
        idled = False
        try:
            self._add(conn)
            with conn.scope:
                await conn.done.wait()
            idled = conn.scope.cancelled_caught
        finally:
            # Finished: by the engine (both EOFs, or a failure, already closed); else an idle
            # timeout or a cancellation (the daemon stopping), still open.
            cancelled = not conn.finished and not idled
            stats.close_reason, clean = ending(conn.failure, idled, cancelled)
            if not conn.finished:
                conn.finished = True
                conn.close(clean)

    def _add(self, conn: _Conn) -> None:
        # Registered for input at once: a request already waiting is reported by the next
        # poll, level-triggered.
        self._ep.register(conn.cfd, _IN)
        self._conns[conn.cfd] = conn
        try:
            self._ep.register(conn.ufd, _IN)
        except OSError:
            self._ep.unregister(conn.cfd)
            del self._conns[conn.cfd]
            raise
        self._conns[conn.ufd] = conn

    def modify(self, fd: int, old: int, mask: int) -> None:
        """Change what ``fd`` is polled for from ``old`` to ``mask``; ``_PARKED`` takes it
        out of the set until the next change puts it back."""
        if mask == _PARKED:
            self._ep.unregister(fd)
        elif old == _PARKED:
            self._ep.register(fd, mask)
        else:
            self._ep.modify(fd, mask)

    def forget(self, conn: _Conn) -> None:
        """Drop the connection, whose sockets are about to close: closing an fd removes it
        from the epoll set (it is never duplicated), before its number can be reused."""
        for fd in (conn.cfd, conn.ufd):
            if self._conns.get(fd) is conn:
                del self._conns[fd]
