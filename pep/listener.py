"""The client-side leg: accept redirected connections, find where they were going, split them.

The original destination comes from the kernel: in REDIRECT mode from conntrack
(SO_ORIGINAL_DST), in TPROXY mode it is the accepted socket's own address. The flow table
recorded by the SYN reader must agree, and a disagreement is logged (the kernel wins: it is
what was actually applied). A connection that was not redirected, i.e. whose original
destination is the listener itself, is closed at once: pep is never an open proxy.

One listening socket per IP version (IPv6 with IPV6_V6ONLY), rather than one dual-stack
socket: IPv4 clients then appear with their plain addresses, as the SYN reader recorded them,
and each family's SO_ORIGINAL_DST is asked at its own level.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from pep.config import Config
from pep.connections import ConnectionTable
from pep.flows import FlowTable
from pep.relay import Relayer, RelayStats, abort
from pep.tuning import STREAM, apply_tuning, reset_if_killed, transparent
from pep.upstream import UpstreamError, open_for

__all__ = ["FdBudget", "Listener", "ListenerCounters", "original_dst"]

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # include/uapi/linux/netfilter_ipv4.h (IP6T_SO_ORIGINAL_DST is 80 too)
# What one Fast Open SYN can carry is bounded by the MSS; more is sent after the handshake.
_FIRST_BYTES_MAX = 64 * 1024
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # sin_family (host order, skipped), port, addr
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, addr, scope id
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
# Clients accepted per wake-up of a listener before the connections already accepted get to
# run: saves a scheduler round trip per client under load, bounds the delay it adds to them.
_ACCEPT_BATCH = 16


def original_dst(sock: socket.socket, family: int) -> tuple[str, int] | None:
    """The pre-NAT destination from conntrack, or None when conntrack has no entry for it.
    (``family`` is the caller's to give: ``sock.family`` builds an enum on every read.)"""
    if family == socket.AF_INET6:
        level, layout = socket.IPPROTO_IPV6, _SOCKADDR_IN6
    else:
        level, layout = socket.SOL_IP, _SOCKADDR_IN
    try:
        raw = sock.getsockopt(level, SO_ORIGINAL_DST, layout.size)
    except OSError:
        return None  # ENOENT: not tracked, so certainly not redirected by us
    port, addr = layout.unpack(raw)
    return socket.inet_ntop(family, addr), port


def is_local_address(host: str) -> bool:
    """Whether ``host`` is one of this namespace's own addresses (bind() without
    IP_TRANSPARENT succeeds only for those)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


class LocalAddresses:
    """``is_local_address``, remembered for ``ttl`` seconds per address.

    The loop guard asks for every connection, and three syscalls per connection buy nothing
    when a gateway's addresses change a few times a day: an address added is guarded within
    ``ttl``. Bounded: the memory is dropped whole at ``size`` addresses.
    """

    def __init__(
        self, ttl: float = 1.0, size: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl, self.size, self._clock = ttl, size, clock
        self._known: dict[str, tuple[bool, float]] = {}

    def __contains__(self, host: str) -> bool:
        now = self._clock()
        known = self._known.get(host)
        if known is not None and known[1] > now:
            return known[0]
        if len(self._known) >= self.size:
            self._known.clear()
        local = is_local_address(host)
        self._known[host] = (local, now + self.ttl)
        return local


@dataclass(slots=True)
class ListenerCounters:
    accepted: int = 0
    split: int = 0
    not_redirected: int = 0  # direct connections to the listener: refused (no open proxy)
    refused_local: int = 0  # redirected to one of the gateway's own addresses: refused
    flow_missing: int = 0  # redirected, but the SYN reader had no record (e.g. evicted)
    flow_mismatch: int = 0  # flow table and SO_ORIGINAL_DST disagree
    upstream_failed: int = 0
    accept_errors: int = 0
    refused_no_fd: int = 0  # out of descriptors at accept(): reset at once, not left hanging
    active: int = 0


class FdBudget:
    """Whether one more split connection fits under RLIMIT_NOFILE; the SYN reader asks per SYN.

    Past the limit accept() fails with EMFILE and a redirected client waits in the backlog,
    neither served nor refused. So while fewer than ``PER_CONNECTION`` descriptors plus a
    ``RESERVE`` are free, new flows are let through unsplit (end to end) instead. The count is
    read from /proc/self/fd only when it matters (the estimate is within a factor of three of
    the limit) and at most every ``interval`` seconds; SYNs split since the last reading count
    ``PER_CONNECTION`` each.
    """

    PER_CONNECTION = 6  # two sockets, and a splice pipe (two fds) per direction moving data
    RESERVE = 16  # status and metrics clients, strict mode's upstreams, the accept reserve

    def __init__(self, interval: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
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
            self.limit = _nofile()
        if self.limit is not None and self._estimate(3) > self.limit:
            if now - self._read_at >= self.interval:
                self._read(now)
            if self.limit is not None and self._estimate() > self.limit:
                return False
        self._since += 1
        return True

    def _read(self, now: float) -> None:
        self.limit, self._limit_at = _nofile(), now
        try:
            self._used = len(os.listdir("/proc/self/fd"))
        except OSError:  # EMFILE itself: listing needs a descriptor
            self._used = self.limit or 0
        self._since = 0
        self._read_at = now


def _nofile() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _reserve_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Listener:
    """Owns the listening sockets; every connection runs as a task in the caller's nursery."""

    def __init__(self, cfg: Config, flows: FlowTable) -> None:
        self.cfg = cfg
        self.flows = flows
        self.counters = ListenerCounters()
        self.table = ConnectionTable()  # live connections and totals: pep status, metrics
        self.relayer = Relayer()  # moves the bytes of every connection (pep.relay)
        self.local = LocalAddresses()  # the loop guard's memory
        self.socks = [self._socket(_FAMILY[f]) for f in cfg.families]
        self.fds = FdBudget()  # asked by the SYN reader (daemon.serve wires it)
        # One descriptor held back: out of descriptors, it is freed to accept and reset a
        # waiting client (see _refuse_one).
        self._reserve = _reserve_fd()
        self._logged_no_fd = -math.inf

    def _socket(self, family: int) -> socket.socket:
        sock = socket.socket(family, STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.cfg.workers > 1:  # each worker binds its own socket on the port (pep.workers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.cfg.mode == "tproxy":
            transparent(sock)
        # Accepted sockets inherit buffers, congestion control and TCP_NODELAY from the
        # listener; buffers must be set here to count in the window scale of the SYN-ACK.
        apply_tuning(sock, self.cfg.client)
        # And SO_LINGER 0: from accept on, a crash resets the client (see reset_if_killed).
        reset_if_killed(sock)
        if self.cfg.tcp_fastopen:
            # Queue length for pending Fast Open requests (the kernel's own listeners use
            # the backlog here too).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, self.cfg.backlog)
        return sock

    def bind(self) -> None:
        for sock in self.socks:
            host = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
            try:
                sock.bind((host, self.cfg.listen_port))
            except OSError as e:
                raise OSError(
                    e.errno, f"cannot listen on [{host}]:{self.cfg.listen_port}: {e.strerror}"
                ) from None
            sock.listen(self.cfg.backlog)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept on every listening socket until cancelled; the connections, and the relay
        engine they share, run in ``nursery``."""
        await nursery.start(self.relayer.run)
        async with trio.open_nursery() as accepting:
            for sock in self.socks:
                accepting.start_soon(self._accept_loop, sock, nursery)

    async def _accept_loop(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Accept every waiting client per wake-up (up to ``_ACCEPT_BATCH``), each handled by
        its own task; plain sockets, as in pep.upstream."""
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_ACCEPT_BATCH):
                if not await self._accept_one(sock, nursery):
                    break

    async def _accept_one(self, sock: socket.socket, nursery: trio.Nursery) -> bool:
        """Accept one client; False when none is waiting (or accepting must pause)."""
        while True:
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                return False
            except OSError as e:
                self.counters.accept_errors += 1
                if e.errno in (errno.EMFILE, errno.ENFILE) and await self._refuse_one(sock):
                    return True
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the connection stays in the backlog.
                    # Back off instead of spinning on a listener that stays readable.
                    log.warning("accept: %s; pausing 100 ms", e.strerror)
                    await trio.sleep(0.1)
                    return False
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up before accept; nothing to do
                raise
            client.setblocking(False)  # accept4() does not pass O_NONBLOCK on
            self.counters.accepted += 1
            nursery.start_soon(self._guarded, client)
            return True

    async def _refuse_one(self, sock: socket.socket) -> bool:
        """Out of descriptors: accept one waiting client with the reserve descriptor and reset
        it, so it is refused at once instead of hanging in the backlog until a descriptor
        frees. The SYN reader stops splitting before this happens (FdBudget); this is for
        flows it let through just before the descriptors ran out. False: no reserve to use."""
        if self._reserve is None:
            self._reserve = _reserve_fd()
            return False
        waiting = select.poll()
        waiting.register(sock.fileno(), select.POLLIN)
        if not waiting.poll(0):
            # accept() reserves a descriptor before it looks for a client: EMFILE with none
            # waiting. Sleep until one comes (no polling), then refuse it or serve it.
            await trio.lowlevel.wait_readable(sock)
            return True
        os.close(self._reserve)
        self._reserve = None
        try:
            client, _ = sock.accept()  # a client is waiting
        except OSError:
            self._reserve = _reserve_fd()
            return False
        abort(client)
        self._reserve = _reserve_fd()  # the slot the client had
        self.counters.refused_no_fd += 1
        now = time.monotonic()
        if now - self._logged_no_fd >= 10:  # at most one line per 10 s
            self._logged_no_fd = now
            log.warning(
                "out of file descriptors: resetting waiting clients (%d so far); new flows "
                "bypass pep until descriptors free",
                self.counters.refused_no_fd,
            )
        return True

    async def _guarded(self, client: socket.socket) -> None:
        """One connection's failure, even a bug, must not take the other connections down."""
        try:
            await self.handle(client)
        except Exception:
            log.exception("connection handler failed; connection dropped")
            abort(client)

    async def handle(self, client: socket.socket) -> None:
        c = self.counters
        try:
            peer = client.getpeername()[:2]  # IPv6 adds flowinfo, scope id
            local = client.getsockname()[:2]
        except OSError:
            client.close()  # reset between accept and here
            return
        dst = self._original_dst(client, local)
        if dst is None:
            c.not_redirected += 1
            log.info(
                "refused %s:%d -> %s:%d: not redirected (pep is not an open proxy)", *peer, *local
            )
            abort(client)
            return
        if dst[0] in self.local:
            # Loop guard: the queue rule never marks SYNs for the gateway's own addresses, so
            # only a foreign mark (another tool's rule, a misconfiguration) gets here. pep must
            # not become a relay into the gateway's own services, nor connect to itself.
            c.refused_local += 1
            log.warning(
                "refused %s:%d -> %s:%d: the destination is this gateway (loop guard)", *peer, *dst
            )
            abort(client)
            return
        flow = self.flows.claim((peer[0], peer[1]))
        if flow is None:
            c.flow_missing += 1
            log.debug("no SYN record for %s:%d (using SO_ORIGINAL_DST)", *peer)
        elif flow.original_dst != dst:
            c.flow_mismatch += 1
            log.warning(
                "flow table says %s:%d, SO_ORIGINAL_DST says %s:%d for %s:%d; using the latter",
                *flow.original_dst,
                *dst,
                *peer,
            )
        flow_text = "{}:{}".format(*flow.original_dst) if flow else "-"
        t0 = time.monotonic()
        conn = self.table.open(peer, dst, flow_text)
        upstream = None
        try:
            first = b""
            if flow is not None and flow.upstream is not None:
                upstream = flow.upstream  # strict mode: opened before the SYN was let through
            else:
                if self.cfg.tcp_fastopen:
                    first = await self._first_bytes(client)
                upstream = await open_for(self.cfg, dst, peer, flow.syn if flow else None, first)
            if first:
                await self._consume(client, len(first))
        except UpstreamError as e:
            c.upstream_failed += 1
            self.table.close(conn, failure=e.reason)
            log.info("upstream %s:%d for %s:%d: %s; resetting client", *dst, *peer, e.reason)
            abort(client)
            return
        except OSError as e:  # the client reset while its first bytes were being forwarded
            log.info("client %s:%d gone before the relay started: %s", *peer, e)
            self.table.close(conn)
            abort(client)
            if upstream is not None:
                abort(upstream)
            return
        except BaseException:  # cancelled: the daemon is stopping
            self.table.close(conn)
            abort(client)
            if upstream is not None:
                abort(upstream)
            raise
        reset_if_killed(upstream)
        c.split += 1
        c.active += 1
        connect_ms = (time.monotonic() - t0) * 1000
        log.debug(
            "split %s:%d -> %s:%d flow=%s connect=%.1fms",
            *peer,
            *dst,
            flow_text,
            connect_ms,
        )
        stats = RelayStats(up=len(first))
        self.table.established(conn, stats, connect_ms / 1000)
        try:
            await self.relayer.relay(
                client,
                upstream,
                stats,
                pipe_size=self.cfg.pipe_size,
                idle_timeout=self.cfg.idle_timeout,
            )
        finally:
            c.active -= 1
            self.table.close(conn)
            log.info(
                "closed %s:%d -> %s:%d flow=%s duration=%.3fs up=%d down=%d reason=%s",
                *peer,
                *dst,
                flow_text,
                time.monotonic() - t0,
                stats.up,
                stats.down,
                stats.close_reason,
            )

    def _original_dst(
        self, client: socket.socket, local: tuple[str, int]
    ) -> tuple[str, int] | None:
        """Where the client was going, or None when it came to the listener itself."""
        if self.cfg.mode == "tproxy":
            # A TPROXY'd socket's own address is the original destination. Only a direct
            # connection has our port on one of our own addresses: the queue rule never marks
            # SYNs for local addresses, so those are never TPROXY'd.
            dst = (local[0], local[1])
            if dst[1] == self.cfg.listen_port and dst[0] in self.local:
                return None
            return dst
        dst = original_dst(client, socket.AF_INET6 if ":" in local[0] else socket.AF_INET)
        return None if dst is None or dst == (local[0], local[1]) else dst

    async def _first_bytes(self, client: socket.socket) -> bytes:
        """Peek at what the client sent first, waiting at most ``fastopen_wait``.

        Peeked, not read: if the upstream connect fails nothing was taken from the client,
        and an EOF or error stays in the socket for the relay to see.
        """
        with trio.move_on_after(self.cfg.fastopen_wait):
            await trio.lowlevel.wait_readable(client)
            try:
                return client.recv(_FIRST_BYTES_MAX, socket.MSG_PEEK)
            except OSError:  # the client already reset: the relay will see it too
                return b""
        return b""  # nothing yet: a server-speaks-first protocol

    @staticmethod
    async def _consume(client: socket.socket, n: int) -> None:
        """Drop the ``n`` peeked bytes that the upstream SYN already carried."""
        while n:
            try:
                got = len(client.recv(n))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(client)
                continue
            if not got:
                raise ConnectionResetError("client closed while its first bytes were in flight")
            n -= got
