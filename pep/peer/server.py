"""The far end of ``[peer]``: the peer listener near PEPs keep their pooled connections on.

Not an open proxy. A connection is served only when it comes from an ``allow`` network and
proves the shared key (pep.peer.wire's handshake) within HANDSHAKE_TIMEOUT; its flow only when
the header is well formed and the destination is not one of this gateway's own addresses (the
loop guard every split connection has). Anything else is closed with an RST without connecting
anywhere, counted, and logged at most every LOG_EVERY seconds (a scan must not flood the log).

A connection that passed then waits in the near end's pool, for minutes if need be
(``idle_timeout`` bounds it), until its FLOW header comes. The far end then connects to the
destination as for any split flow (its [upstream] tuning, [link], transparent_source), answers
with a STATUS byte, and hands both sockets to the relay: from there on it is an ordinary split
connection in the connection table, ``pep status`` and the close log. The near end's policy
decided that the flow uses the pool; this end's [[policy]] is not consulted again.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

import trio

from pep.capture.preconnect import UpstreamError
from pep.config import Config
from pep.config.peer import Peer
from pep.config.schema import parse_listen_address
from pep.peer import wire as peerwire
from pep.peer.pool import PeerGone, read_exactly, send_all
from pep.split.hooks import Opened
from pep.split.lifecycle import abort, reset_if_killed
from pep.split.session import Sessions
from pep.split.sockopts import STREAM, apply_tuning, restart_congestion
from pep.split.upstream import open_for
from pep.support.errors import describe
from pep.support.ratelog import Every

__all__ = ["PeerListener", "ServeCounters"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds for HELLO and ANSWER to arrive: a few GEO round trips
LOG_EVERY = 10.0  # at most one line per this many seconds per kind of refusal
_STATUS_OF = (  # UpstreamError reasons (pep.split.upstream) -> the STATUS the near end gets
    ("timeout", peerwire.TIMEOUT),
    ("ECONNREFUSED", peerwire.REFUSED),
)


@dataclass(slots=True)
class ServeCounters:
    accepted: int = 0  # connections that proved the key
    not_allowed: int = 0  # from outside `allow`: closed at once
    auth_failed: int = 0  # no proof, a wrong one, or garbage instead of the handshake
    bad_header: int = 0  # authenticated, but no valid FLOW header
    forbidden: int = 0  # the destination is this gateway: loop guard
    flows: int = 0  # flows connected and relayed
    upstream_failed: int = 0  # the destination refused or did not answer


class PeerListener:
    def __init__(self, peer: Peer, secret: bytes, cfg: Config, sessions: Sessions) -> None:
        self.peer, self.secret, self.cfg, self.sessions = peer, secret, cfg, sessions
        self.address = parse_listen_address(peer.listen)
        self.counters = ServeCounters()
        self.sock: socket.socket | None = None
        self._log = Every(LOG_EVERY)  # per kind of refusal

    def bind(self) -> None:
        host, port = self.address
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.cfg.workers > 1:  # every worker listens, as on the split port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Accepted sockets inherit it, and the receive buffer in place when a near end's
            # SYN arrives caps the window its pooled connection starts with: near ends come
            # across the link, so with [link] that is the link's (its initrwnd then opens the
            # window for a whole ingress BDP, before the first flow: uploads included).
            tuning = self.cfg.client
            if self.cfg.link is not None:
                tuning = self.cfg.link.leg_tuning(tuning)
            apply_tuning(sock, tuning)
            sock.bind((host, port))
            sock.listen(self.cfg.backlog)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"peer listener [{host}]:{port}: {describe(e)}") from None
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept until cancelled; each connection's task runs in ``nursery`` (the daemon's
        connections: drained and reset with the others on SIGTERM)."""
        assert self.sock is not None
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await trio.sleep(0.1)  # as the split listener backs off (pep.split.listener)
                continue
            conn.setblocking(False)
            nursery.start_soon(self._guarded, conn, (addr[0], addr[1]))

    async def _guarded(self, conn: socket.socket, near: tuple[str, int]) -> None:
        try:
            await self.handle(conn, near)
        except Exception:
            log.exception("peer connection from %s:%d failed", *near)
            abort(conn)

    async def handle(self, conn: socket.socket, near: tuple[str, int]) -> None:
        c = self.counters
        reset_if_killed(conn)
        ip = ipaddress.ip_address(near[0])
        if not any(ip.version == n.version and ip in n for n in self.peer.allow):
            c.not_allowed += 1
            self._refused("not_allowed", f"peer connection from {near[0]}: not in peer.allow")
            abort(conn)
            return
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await self._handshake(conn)
        except (PeerGone, peerwire.WireError, trio.TooSlowError) as e:
            c.auth_failed += 1
            why = describe(e)
            self._refused("auth", f"peer connection from {near[0]}: handshake failed ({why})")
            abort(conn)
            return
        c.accepted += 1
        try:
            with trio.move_on_after(self.cfg.idle_timeout or float("inf")) as waiting:
                head = await read_exactly(conn, peerwire.FLOW_HEAD_LEN)
                rest = await read_exactly(conn, peerwire.flow_size(head) - len(head))
            if waiting.cancelled_caught:
                abort(conn)  # pooled past idle_timeout: the near end opens a fresh one
                return
            parsed = peerwire.parse_flow(head + rest)
        except PeerGone:
            conn.close()  # the near end let it go (its pool shrank, or it stopped)
            return
        except peerwire.WireError as e:
            c.bad_header += 1
            self._refused("header", f"peer connection from {near[0]}: {describe(e)}")
            abort(conn)
            return
        assert parsed is not None
        restart_congestion(conn)  # its flow starts as a new connection's would
        await self._relay(conn, near, parsed[0])

    async def _handshake(self, conn: socket.socket) -> None:
        parsed = peerwire.parse_hello(await read_exactly(conn, peerwire.HELLO_LEN))
        assert parsed is not None
        hello = parsed[0]
        nonce = _nonce()
        proof = peerwire.far_proof(self.secret, hello.nonce, nonce)
        await send_all(conn, peerwire.encode_challenge(nonce, proof))
        answer = await read_exactly(conn, peerwire.ANSWER_LEN)
        if not peerwire.verify(peerwire.near_proof(self.secret, hello.nonce, nonce), answer):
            raise peerwire.WireError("wrong key")
        await send_all(conn, peerwire.READY)

    async def _relay(self, conn: socket.socket, near: tuple[str, int], flow: peerwire.Flow) -> None:
        c, sessions = self.counters, self.sessions
        dst, client = flow.dst, flow.src
        if dst[0] in sessions.local:
            c.forbidden += 1
            self._refused("forbidden", f"peer flow from {near[0]} to {dst[0]}: this gateway")
            await _answer(conn, peerwire.FORBIDDEN)
            abort(conn)
            return

        async def connect() -> Opened:
            # As any split flow's upstream leg: with this end's transparent_source, from the
            # client's own address (the header carries it).
            upstream = await open_for(self.cfg, dst, client, None, links=sessions.links)
            try:
                await send_all(conn, bytes([peerwire.CONNECTED]))
            except PeerGone as e:
                abort(upstream)
                raise ConnectionResetError(f"the near end left: {describe(e)}") from None
            c.flows += 1
            return Opened(upstream, dst[0])

        async def refuse(e: UpstreamError) -> None:
            c.upstream_failed += 1
            log.info("peer flow %s:%d -> %s:%d: %s", *client, *dst, e.reason)
            await _answer(conn, _status(e.reason))
            abort(conn)

        await sessions.splice(
            conn, peer=client, dst=dst, flow_text=f"peer {near[0]}", client_via=near[0],
            connect=connect, refuse=refuse,
        )  # fmt: skip

    def _refused(self, kind: str, text: str) -> None:
        if self._log(kind):
            log.warning("%s; closed (counted in pep status)", text)

    def snapshot(self) -> dict[str, object]:
        c = self.counters
        return {
            "listen": self.peer.listen,
            "accepted": c.accepted,
            "not_allowed": c.not_allowed,
            "auth_failed": c.auth_failed,
            "bad_header": c.bad_header,
            "forbidden": c.forbidden,
            "flows": c.flows,
            "upstream_failed": c.upstream_failed,
        }


def _nonce() -> bytes:
    return os.urandom(peerwire.NONCE_LEN)


def _status(reason: str) -> int:
    for text, status in _STATUS_OF:
        if text in reason:
            return status
    return peerwire.UNREACHABLE


async def _answer(conn: socket.socket, status: int) -> None:
    with contextlib.suppress(PeerGone):  # it left: nobody to tell
        await send_all(conn, bytes([status]))
