"""The per-connection session: from an accepted client to a relayed, accounted split connection.

For each client the listener accepts (pep.split.listener): find where it was going and refuse
it if that is nowhere or the gateway itself (pep.split.origdst, decided by
pep.split.admission), claim the flow the SYN reader recorded, open the upstream leg (with Fast
Open, carrying the client's first bytes; in strict mode it is already open,
pep.capture.preconnect; through a pool of legs opened ahead, pep.split.hooks.UpstreamPool,
when one serves the destination), relay until both sides are done (pep.split.relay), and
account for it in the connection table and the counters that ``pep status`` shows.

``Sessions.splice`` is that last part, open-account-relay, for the listener's clients and for
the flows the far end of ``[peer]`` receives (pep.peer.server) alike.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from pep.capture.flows import Flow, FlowTable
from pep.capture.preconnect import UpstreamError
from pep.config import Config
from pep.split import admission
from pep.split.connections import Connection, ConnectionTable
from pep.split.hooks import NO_LINK, LinkSide, Opened, Paced, UpstreamPool
from pep.split.lifecycle import abort, reset_if_killed
from pep.split.origdst import LocalAddresses, OriginalDst
from pep.split.relay import Relayer
from pep.split.relay_state import RelayStats
from pep.split.sockopts import apply_tuning
from pep.split.upstream import open_for
from pep.support.errors import describe

__all__ = ["ListenerCounters", "Sessions"]

log = logging.getLogger(__name__)

# What one Fast Open SYN can carry is bounded by the MSS; more is sent after the handshake.
_FIRST_BYTES_MAX = 64 * 1024

Addr = tuple[str, int]


@dataclass(slots=True)
class ListenerCounters:
    """The client-side leg's counters (``pep status`` section "listener"): the accept loop
    (pep.split.listener) counts what it accepted or refused, the sessions the rest."""

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


class Sessions:
    """Runs the session of every connection one listener accepts (``run``, one task each),
    and holds what they share: the flow table, the connection table, the relay engine.

    ``links``: the satellite link, when there is one (pep.link.legs.LinkLegs); ``pools``:
    legs opened ahead of time (pep.peer.pool.PeerPool), each tried for the destinations it
    serves before a direct connect. The daemon (pep.ops.daemon) wires both in.
    """

    def __init__(
        self,
        cfg: Config,
        flows: FlowTable,
        links: LinkSide = NO_LINK,
        pools: Sequence[UpstreamPool] = (),
    ) -> None:
        # The running config, read per connection (timeouts, pipe size, the upstream leg):
        # pep.ops.runtime swaps it on SIGHUP, so live connections keep what they started with.
        self.cfg = cfg
        self.flows = flows
        self.links = links
        self.pools = tuple(pools)
        self.counters = ListenerCounters()
        self.table = ConnectionTable()  # live connections and totals: pep status, metrics
        self.relayer = Relayer()  # moves the bytes of every connection (pep.split.relay)
        self.local = LocalAddresses()  # the loop guard's memory
        self.origdst = OriginalDst(cfg.mode, cfg.listen_port, self.local)

    async def run(self, client: socket.socket) -> None:
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
        dst = self.origdst.lookup(client, local)
        refused = admission.refusal(dst, dst is not None and dst[0] in self.local)
        if refused is not None:
            setattr(c, refused.counter, getattr(c, refused.counter) + 1)
            where = dst if dst is not None else local
            log.log(refused.level, "refused %s:%d -> %s:%d: %s", *peer, *where, refused.reason)
            abort(client)
            return
        assert dst is not None
        flow = self.flows.claim((peer[0], peer[1]))
        recorded = flow.original_dst if flow is not None else None
        note = admission.flow_check(recorded, dst)
        if note is not None:
            setattr(c, note, getattr(c, note) + 1)
            if recorded is None:
                log.debug("no SYN record for %s:%d (using SO_ORIGINAL_DST)", *peer)
            else:
                log.warning(
                    "flow table says %s:%d, SO_ORIGINAL_DST says %s:%d for %s:%d; using the latter",
                    *recorded, *dst, *peer,
                )  # fmt: skip

        async def refuse(e: UpstreamError) -> None:
            c.upstream_failed += 1
            log.info("upstream %s:%d for %s:%d: %s; resetting client", *dst, *peer, e.reason)
            abort(client)

        await self.splice(
            client, peer=peer, dst=dst, client_via=peer[0], refuse=refuse,
            flow_text="{}:{}".format(*recorded) if recorded else "-",
            connect=lambda: self._upstream(client, peer, dst, flow),
        )  # fmt: skip

    async def splice(
        self,
        client: socket.socket,
        *,
        peer: Addr,
        dst: Addr,
        flow_text: str,
        client_via: str,
        connect: Callable[[], Awaitable[Opened]],
        refuse: Callable[[UpstreamError], Awaitable[None]],
    ) -> None:
        """Open the upstream leg (``connect``), account for the connection, relay it: the one
        sequence for the listener's clients and the far end's pooled flows (pep.peer.server).
        ``refuse`` answers ``client`` when the destination refused (UpstreamError); an OSError
        from ``connect`` means the client went away meanwhile; ``connect`` closes what it
        opened before it raises. ``client_via``: where the client leg's socket goes (for the
        link)."""
        t0 = time.monotonic()
        conn = self.table.open(peer, dst, flow_text)
        try:
            opened = await connect()
        except UpstreamError as e:
            self.table.close(conn, failure=e.reason)
            await refuse(e)
            return
        except OSError as e:
            log.info("client %s:%d gone before the relay started: %s", *peer, describe(e))
            self.table.close(conn)
            abort(client)
            return
        except BaseException:  # cancelled: the daemon is stopping
            self.table.close(conn)
            abort(client)
            raise
        try:
            await self.relay(
                conn, client, opened.sock, peer=peer, dst=dst, flow_text=flow_text, t0=t0,
                first=opened.first, client_via=client_via, upstream_via=opened.via,
            )  # fmt: skip
        finally:
            if opened.done is not None:
                opened.done()

    async def _upstream(
        self, client: socket.socket, peer: Addr, dst: Addr, flow: Flow | None
    ) -> Opened:
        """The upstream leg, its Fast Open bytes already consumed from the client: strict
        mode's (opened before the SYN was let through), one a pool serves the destination
        with, or a direct connect (also when the pool had none, counted by the pool)."""
        if flow is not None and flow.upstream is not None:
            return Opened(flow.upstream, dst[0])
        pool = next((p for p in self.pools if p.serves(dst[0])), None)
        first = b""
        if pool is not None or self.cfg.tcp_fastopen:
            first = await self._first_bytes(client)
        opened = await pool.open(dst, peer, first) if pool is not None else None
        if opened is None:
            if not self.cfg.tcp_fastopen:
                first = b""  # peeked, not sent: it stays in the client's socket for the relay
            syn = flow.syn if flow else None
            sock = await open_for(self.cfg, dst, peer, syn, first, links=self.links)
            opened = Opened(sock, dst[0])
        if first:
            try:
                await self._consume(client, len(first))
            except BaseException:
                abort(opened.sock)
                if opened.done is not None:
                    opened.done()
                raise
            opened.first = len(first)
        return opened

    async def relay(
        self,
        conn: Connection,
        client: socket.socket,
        upstream: socket.socket,
        *,
        peer: Addr,
        dst: Addr,
        flow_text: str,
        t0: float,
        first: int,
        client_via: str,
        upstream_via: str,
    ) -> None:
        """Relay one split connection and account for it. ``first``: bytes the upstream SYN
        already carried; ``client_via`` / ``upstream_via``: where each leg's socket goes, for
        the link."""
        c = self.counters
        reset_if_killed(upstream)
        c.split += 1
        c.active += 1
        connect_ms = (time.monotonic() - t0) * 1000
        log.debug("split %s:%d -> %s:%d flow=%s connect=%.1fms", *peer, *dst, flow_text, connect_ms)
        stats = RelayStats(up=first)
        self.table.established(conn, stats, connect_ms / 1000)
        legs = self._link_legs(
            client, (client_via, peer[0]), upstream, (upstream_via, dst[0]), stats
        )
        conn.links = legs
        try:
            await self.relayer.relay(
                client,
                upstream,
                stats,
                pipe_size=self.cfg.pipe_size,
                idle_timeout=self.cfg.idle_timeout,
                links=legs,
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

    def _link_legs(
        self,
        client: socket.socket,
        client_at: tuple[str, str],
        upstream: socket.socket,
        upstream_at: tuple[str, str],
        stats: RelayStats,
    ) -> tuple[Paced | None, Paced | None]:
        """The legs of this connection that send into the link, entered in its sharer: the
        client leg when the client is reached through the link (its connection arrived on
        it), the upstream leg when the destination is (its tuning was set before connect,
        pep.split.upstream.open_for). A client leg gets the link's tuning here: its buffers
        are the listener's (pep.split.listener sets them for connections arriving on the
        link). Each ``*_at`` is (where the socket goes, the address across the link it
        serves: the client's, or the destination's; with [peer] the client's own behind the
        pooled connection), which names a hub's terminal."""
        links = self.links
        (client_via, client_far), (upstream_via, upstream_far) = client_at, upstream_at
        on_client = None
        if links.faces(client_via):
            apply_tuning(client, links.tuning(self.cfg.client, client_far))
            on_client = links.join(client, stats, up=False, far=client_far)
        on_upstream = None
        if links.faces(upstream_via):
            on_upstream = links.join(upstream, stats, up=True, far=upstream_far)
        return on_client, on_upstream

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
