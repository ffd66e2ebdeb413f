"""The per-connection session: from an accepted client to a relayed, accounted split connection.

For each client the listener accepts (pep.listener): find where it was going and refuse it if
that is nowhere or the gateway itself (pep.origdst), claim the flow the SYN reader recorded,
connect upstream (with Fast Open, carrying the client's first bytes; in strict mode the
upstream is already open, pep.preconnect), relay until both sides are done (pep.relay), and
account for it in the connection table and the counters that ``pep status`` shows.

The flow table must agree with the kernel about the destination; a disagreement is logged
(the kernel wins: it is what was actually applied).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import trio

from pep import peerwire
from pep.config import Config
from pep.connections import Connection, ConnectionTable
from pep.flows import Flow, FlowTable
from pep.linkctl import LinkLegs
from pep.linkshare import LinkLeg
from pep.origdst import LocalAddresses, OriginalDst
from pep.peerpool import PeerGone, PeerPool, read_exactly, send_all
from pep.relay import Relayer, RelayStats
from pep.tuning import abort, apply_tuning, reset_if_killed, restart_congestion
from pep.upstream import UpstreamError, open_for

__all__ = ["ListenerCounters", "Sessions"]

log = logging.getLogger(__name__)

# What one Fast Open SYN can carry is bounded by the MSS; more is sent after the handshake.
_FIRST_BYTES_MAX = 64 * 1024
# How much longer than connect_timeout a flow waits for the far PEP's STATUS: its own connect
# is bounded by its connect_timeout, and the answer still has to cross the link (5 s: the
# longest [link] rtt).
PEER_STATUS_MARGIN = 5.0


@dataclass(slots=True)
class ListenerCounters:
    """The client-side leg's counters (``pep status`` section "listener"): the accept loop
    (pep.listener) counts what it accepted or refused, the sessions the rest."""

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
    and holds what they share: the flow table, the connection table, the relay engine."""

    def __init__(
        self,
        cfg: Config,
        flows: FlowTable,
        links: LinkLegs | None = None,
        pool: PeerPool | None = None,
    ) -> None:
        # The running config, read per connection (timeouts, pipe size, the upstream leg):
        # pep.control swaps it on SIGHUP, so live connections keep what they started with.
        self.cfg = cfg
        self.flows = flows
        # The link (pep.linkctl): which legs cross it, their tuning and their pacing.
        self.links = links if links is not None else LinkLegs(None)
        self.pool = pool  # [peer] connect: pooled connections to the far PEP
        self.counters = ListenerCounters()
        self.table = ConnectionTable()  # live connections and totals: pep status, metrics
        self.relayer = Relayer()  # moves the bytes of every connection (pep.relay)
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
        first = b""
        via = dst[0]  # where the upstream leg goes: the destination, or the far PEP
        try:
            if flow is not None and flow.upstream is not None:
                upstream = flow.upstream  # strict mode: opened before the SYN was let through
            else:
                upstream, first, via = await self._upstream(client, peer, dst, flow)
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
        pooled = via != dst[0]
        if pooled:
            self.pool.counters.in_use += 1  # type: ignore[union-attr]
        try:
            await self.relay(
                conn, client, upstream, peer=peer, dst=dst, flow_text=flow_text, t0=t0,
                first=len(first), client_via=peer[0], upstream_via=via,
            )  # fmt: skip
        finally:
            if pooled:
                self.pool.counters.in_use -= 1  # type: ignore[union-attr]

    async def _upstream(
        self,
        client: socket.socket,
        peer: tuple[str, int],
        dst: tuple[str, int],
        flow: Flow | None,
    ) -> tuple[socket.socket, bytes, str]:
        """The upstream leg, its Fast Open bytes (to be consumed from the client) and the
        address it goes to: through a pooled connection to the far PEP when there is one for
        this destination ([peer]), else direct (and counted a fallback when the pool had none,
        or the one it had died before the far end answered). UpstreamError when the far end
        or the destination refused."""
        first = b""
        pool = self.pool
        if pool is not None and pool.serves(dst[0]):
            first = await self._first_bytes(client)
            sock = pool.take()
            if sock is not None:
                restart_congestion(sock)
                try:
                    status = await self._open_flow(sock, dst, peer, first)
                except PeerGone as e:
                    log.info("peer connection for %s:%d -> %s:%d: %s; going direct", *peer, *dst, e)
                    abort(sock)
                else:
                    if status == peerwire.CONNECTED:
                        return sock, first, pool.address[0]
                    abort(sock)
                    raise UpstreamError(f"far end: {peerwire.STATUS_TEXT[status]}")
            pool.counters.fallback += 1
            if not self.cfg.tcp_fastopen:
                first = b""  # peeked, not sent: it stays in the client's socket for the relay
        elif self.cfg.tcp_fastopen:
            first = await self._first_bytes(client)
        syn = flow.syn if flow else None
        upstream = await open_for(self.cfg, dst, peer, syn, first, links=self.links)
        return upstream, first, dst[0]

    async def _open_flow(
        self, sock: socket.socket, dst: tuple[str, int], peer: tuple[str, int], first: bytes
    ) -> int:
        """Send the FLOW header and the client's first bytes on a pooled connection; the far
        end's STATUS once it has tried the destination (its connect bounded by its own
        connect_timeout: ours waits that long, plus a margin for the link)."""
        transparent = self.cfg.transparent_source
        header = peerwire.encode_flow(peerwire.Flow(dst, peer, transparent))
        with trio.move_on_after(self.cfg.connect_timeout + PEER_STATUS_MARGIN) as waiting:
            await send_all(sock, header + first)
            status = peerwire.parse_status(await read_exactly(sock, 1))
        if waiting.cancelled_caught:
            raise PeerGone("no answer from the far end")
        assert status is not None
        return status

    async def relay(
        self,
        conn: Connection,
        client: socket.socket,
        upstream: socket.socket,
        *,
        peer: tuple[str, int],
        dst: tuple[str, int],
        flow_text: str,
        t0: float,
        first: int,
        client_via: str,
        upstream_via: str,
    ) -> None:
        """Relay one split connection and account for it (the far end of [peer] relays its
        pooled connections here too). ``first``: bytes the upstream SYN already carried;
        ``client_via`` / ``upstream_via``: where each leg's socket goes, for the link."""
        c = self.counters
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
        stats = RelayStats(up=first)
        self.table.established(conn, stats, connect_ms / 1000)
        legs = self._link_legs(client, client_via, upstream, upstream_via, stats)
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
        client_via: str,
        upstream: socket.socket,
        upstream_via: str,
        stats: RelayStats,
    ) -> tuple[LinkLeg | None, LinkLeg | None]:
        """The legs of this connection that send into the link, entered in its sharer: the
        client leg when the client is reached through the link (its connection arrived on
        it), the upstream leg when the destination is (its tuning was set before connect,
        pep.upstream.open_for). A client leg gets the link's tuning here: its buffers are the
        listener's (pep.listener sets them for connections arriving on the link)."""
        links = self.links
        if links.link is None or links.sharer is None:
            return None, None
        on_client = None
        if links.faces(client_via):
            apply_tuning(client, links.tuning(self.cfg.client))
            on_client = links.sharer.open(client, stats, up=False)
        on_upstream = None
        if links.faces(upstream_via):
            on_upstream = links.sharer.open(upstream, stats, up=True)
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
