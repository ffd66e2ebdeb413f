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
import socket
import struct
import time
from dataclasses import dataclass

import trio

from pep.config import Config
from pep.connections import ConnectionTable
from pep.flows import FlowTable
from pep.relay import RelayStats, abort, relay
from pep.tuning import apply_tuning, transparent
from pep.upstream import UpstreamError, open_for

__all__ = ["Listener", "ListenerCounters", "original_dst"]

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # include/uapi/linux/netfilter_ipv4.h (IP6T_SO_ORIGINAL_DST is 80 too)
# What one Fast Open SYN can carry is bounded by the MSS; more is sent after the handshake.
_FIRST_BYTES_MAX = 64 * 1024
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # sin_family (host order, skipped), port, addr
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, addr, scope id
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def original_dst(sock: trio.socket.SocketType) -> tuple[str, int] | None:
    """The pre-NAT destination from conntrack, or None when conntrack has no entry for it."""
    if sock.family == socket.AF_INET6:
        level, layout = socket.IPPROTO_IPV6, _SOCKADDR_IN6
    else:
        level, layout = socket.SOL_IP, _SOCKADDR_IN
    try:
        raw = sock.getsockopt(level, SO_ORIGINAL_DST, layout.size)
    except OSError:
        return None  # ENOENT: not tracked, so certainly not redirected by us
    port, addr = layout.unpack(raw)
    return socket.inet_ntop(sock.family, addr), port


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


@dataclass(slots=True)
class ListenerCounters:
    accepted: int = 0
    split: int = 0
    not_redirected: int = 0  # direct connections to the listener: refused (no open proxy)
    flow_missing: int = 0  # redirected, but the SYN reader had no record (e.g. evicted)
    flow_mismatch: int = 0  # flow table and SO_ORIGINAL_DST disagree
    upstream_failed: int = 0
    accept_errors: int = 0
    active: int = 0


class Listener:
    """Owns the listening sockets; every connection runs as a task in the caller's nursery."""

    def __init__(self, cfg: Config, flows: FlowTable) -> None:
        self.cfg = cfg
        self.flows = flows
        self.counters = ListenerCounters()
        self.table = ConnectionTable()  # live connections and totals: pep status, metrics
        self.socks = [self._socket(_FAMILY[f]) for f in cfg.families]

    def _socket(self, family: int) -> trio.socket.SocketType:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
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
        if self.cfg.tcp_fastopen:
            # Queue length for pending Fast Open requests (the kernel's own listeners use
            # the backlog here too).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, self.cfg.backlog)
        return sock

    async def bind(self) -> None:
        for sock in self.socks:
            host = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
            try:
                await sock.bind((host, self.cfg.listen_port))
            except OSError as e:
                raise OSError(
                    e.errno, f"cannot listen on [{host}]:{self.cfg.listen_port}: {e.strerror}"
                ) from None
            sock.listen(self.cfg.backlog)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept on every listening socket until cancelled."""
        async with trio.open_nursery() as accepting:
            for sock in self.socks:
                accepting.start_soon(self._accept_loop, sock, nursery)

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                client, _ = await sock.accept()
            except OSError as e:
                self.counters.accept_errors += 1
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the connection stays in the backlog.
                    # Back off instead of spinning on a listener that stays readable.
                    log.warning("accept: %s; pausing 100 ms", e.strerror)
                    await trio.sleep(0.1)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up before accept; nothing to do
                raise
            self.counters.accepted += 1
            nursery.start_soon(self._guarded, client)

    async def _guarded(self, client: trio.socket.SocketType) -> None:
        """One connection's failure, even a bug, must not take the other connections down."""
        try:
            await self.handle(client)
        except Exception:
            log.exception("connection handler failed; connection dropped")
            abort(client)

    async def handle(self, client: trio.socket.SocketType) -> None:
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
            await relay(
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
        self, client: trio.socket.SocketType, local: tuple[str, int]
    ) -> tuple[str, int] | None:
        """Where the client was going, or None when it came to the listener itself."""
        if self.cfg.mode == "tproxy":
            # A TPROXY'd socket's own address is the original destination. Only a direct
            # connection has our port on one of our own addresses: the queue rule never marks
            # SYNs for local addresses, so those are never TPROXY'd.
            dst = (local[0], local[1])
            if dst[1] == self.cfg.listen_port and is_local_address(dst[0]):
                return None
            return dst
        dst = original_dst(client)
        return None if dst is None or dst == (local[0], local[1]) else dst

    async def _first_bytes(self, client: trio.socket.SocketType) -> bytes:
        """Peek at what the client sent first, waiting at most ``fastopen_wait``.

        Peeked, not read: if the upstream connect fails nothing was taken from the client,
        and an EOF or error stays in the socket for the relay to see.
        """
        with trio.move_on_after(self.cfg.fastopen_wait):
            await trio.lowlevel.wait_readable(client)
            try:
                return await client.recv(_FIRST_BYTES_MAX, socket.MSG_PEEK)
            except OSError:  # the client already reset: the relay will see it too
                return b""
        return b""  # nothing yet: a server-speaks-first protocol

    @staticmethod
    async def _consume(client: trio.socket.SocketType, n: int) -> None:
        """Drop the ``n`` peeked bytes that the upstream SYN already carried."""
        while n:
            got = len(await client.recv(n))
            if not got:
                raise ConnectionResetError("client closed while its first bytes were in flight")
            n -= got
