"""The near end of ``[peer]``: authenticated connections to the far PEP, kept ready for flows.

A flow that crosses to the far PEP takes one (``take``), sends its FLOW header and the client's
first bytes at once, and waits for the far end's STATUS (pep.split.session): no handshake on the
link, and the window is already scaled, so the far end's first flight is a whole initial
window instead of the 64 KB an unscaled SYN window allows (RFC 7323 section 2.2). One flow per
connection: it is not reused; the pool opens another in the background.

The pool keeps ``pool`` connections ready and more while flows take them faster than they come
back (up to ``pool_max``). Each ready connection is watched: one the far end closed or reset
while it sat idle leaves the pool at once, and ``take`` checks again, so a dead one is never
handed to a flow. Failures (refused, no answer, a wrong key) back off from 0.5 s to 10 s, so
a far end that is down costs little, and the pool recovers by itself when it returns; flows
meanwhile go direct (``fallback``, counted by the session).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from pep.capture.preconnect import UpstreamError
from pep.config import Config, LegTuning
from pep.config.peer import Peer
from pep.config.schema import parse_listen_address
from pep.peer import wire as peerwire
from pep.split import lifecycle
from pep.split.hooks import NO_LINK, LinkSide, Opened, patiently
from pep.split.lifecycle import abort, reset_if_killed
from pep.split.sockopts import STREAM, apply_tuning, restart_congestion
from pep.support.errors import describe
from pep.support.ratelog import Every

__all__ = ["PeerGone", "PeerPool", "PoolCounters", "read_exactly", "send_all"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds for the four handshake messages: a few GEO round trips
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0  # seconds between failed attempts, doubling
# Idle pooled connections are probed, so a far end that vanished (power, a routing change)
# is found within about a minute rather than at the next flow (TCP_KEEPIDLE/INTVL/CNT). With
# [link], every Link.heartbeat seconds instead: the answers tell that the link is up
# (pep.link.watch), and the link legs' TCP_USER_TIMEOUT (outage_timeout) decides when an
# unanswered connection is given up, so a fade does not end them (keepalive then aborts only
# once the user timeout has passed: tcp_keepalive_timer).
KEEPALIVE = LegTuning(keepalive=True, keepidle=30, keepintvl=10, keepcnt=3)
DEMAND_WINDOW = 2.0  # seconds of recent takes the pool sizes itself for, above `pool`
LOG_EVERY = 10.0  # at most one line per this many seconds about failures
# How much longer than connect_timeout a flow waits for the far PEP's STATUS: its own connect
# is bounded by its connect_timeout, and the answer still has to cross the link (5 s: the
# longest [link] rtt).
PEER_STATUS_MARGIN = 5.0


class PeerGone(Exception):
    """The pooled connection died before the far end answered: the flow may go direct."""


@dataclass(slots=True)
class PoolCounters:
    opened: int = 0  # connections authenticated and made ready
    taken: int = 0  # handed to flows
    in_use: int = 0  # carrying a flow now (the session counts)
    fallback: int = 0  # flows that went direct: no ready connection, or it died meanwhile
    died_idle: int = 0  # closed by the far end while waiting in the pool
    connect_failed: int = 0
    auth_failed: int = 0  # the far end did not prove the key, or did not accept ours


class _Ready:
    __slots__ = ("scope", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.scope = sock, trio.CancelScope()


class PeerPool:
    """The near end's pool (pep.split.hooks.UpstreamPool). ``oif`` answers which interface an
    address routes through (pep.link.routequery, one cache per process); ``links`` tunes the
    pooled connections as link legs when they cross the link. ``cfg`` is the running config:
    pep.ops.runtime swaps it on SIGHUP (connect_timeout, transparent_source, the tuning)."""

    def __init__(
        self,
        peer: Peer,
        secret: bytes,
        cfg: Config,
        oif: Callable[[str], int | None],
        links: LinkSide = NO_LINK,
    ) -> None:
        self.peer, self.secret, self.cfg = peer, secret, cfg
        self.oif, self.links = oif, links
        self.address = parse_listen_address(peer.connect)
        self.counters = PoolCounters()
        self.ready: deque[_Ready] = deque()
        self.opening = 0
        self._takes: deque[float] = deque()
        self._changed = trio.Event()
        self._backoff = 0.0
        self._retry = trio.Event()  # set when the link comes back: retry now, not after backoff
        self._log = Every(LOG_EVERY)
        self._nursery: trio.Nursery | None = None
        links.on_change(self._link_changed)

    # --- the session's side --------------------------------------------------------------------

    def serves(self, host: str) -> bool:
        """Whether a flow to ``host`` goes through the far PEP: its route leaves the way the
        route to the far PEP does (a destination on this side of the link does not)."""
        via = self.oif(self.address[0])
        return via is not None and self.oif(host) == via

    async def open(
        self, dst: tuple[str, int], client: tuple[str, int], first: bytes
    ) -> Opened | None:
        """A flow's leg through the far PEP: a ready connection with the FLOW header and the
        client's first bytes sent, the far end connected. None when no ready connection was
        there or it died before the far end answered (the flow goes direct: a ``fallback``);
        UpstreamError when the far end's destination refused."""
        sock = self.take()
        if sock is None:
            self.counters.fallback += 1
            return None
        restart_congestion(sock)  # its flow starts as a new connection's would
        try:
            status = await self._open_flow(sock, dst, client, first)
        except PeerGone as e:
            log.info(
                "peer connection for %s:%d -> %s:%d: %s; going direct", *client, *dst, describe(e)
            )
            abort(sock)
            self.counters.fallback += 1
            return None
        if status != peerwire.CONNECTED:
            abort(sock)
            raise UpstreamError(f"far end: {peerwire.STATUS_TEXT[status]}")
        self.counters.in_use += 1
        return Opened(sock, self.address[0], done=self._released)

    def _released(self) -> None:
        self.counters.in_use -= 1

    async def _open_flow(
        self, sock: socket.socket, dst: tuple[str, int], client: tuple[str, int], first: bytes
    ) -> int:
        """Send the FLOW header and the client's first bytes on a pooled connection; the far
        end's STATUS once it has tried the destination (its connect bounded by its own
        connect_timeout: ours waits that long, plus a margin for the link)."""
        header = peerwire.encode_flow(peerwire.Flow(dst, client, self.cfg.transparent_source))
        # Into a fresh connection's send buffer (two BDPs with [link]): at once, link or none.
        await send_all(sock, header + first)
        try:
            # The time the link is down meanwhile does not count (outage_timeout at most):
            # the header is resent by the kernel and crosses when the link is back.
            answer = await patiently(
                lambda: read_exactly(sock, 1),
                self.cfg.connect_timeout + PEER_STATUS_MARGIN,
                self.links,
            )
        except trio.TooSlowError:
            raise PeerGone("no answer from the far end (timeout)") from None
        status = peerwire.parse_status(answer)
        assert status is not None
        return status

    def take(self) -> socket.socket | None:
        """A ready connection, or None (the flow goes direct: counted by the caller)."""
        while self.ready:
            entry = self.ready.pop()  # the most recently opened: its windows the freshest
            entry.scope.cancel()
            self.links.unwatch_socket(entry.sock)
            if _alive(entry.sock):
                self.counters.taken += 1
                self._takes.append(time.monotonic())
                self._changed.set()
                return entry.sock
            self.counters.died_idle += 1
            entry.sock.close()
        self._changed.set()
        return None

    @property
    def target(self) -> int:
        """``pool``, plus what flows took over the last DEMAND_WINDOW, up to ``pool_max``."""
        now = time.monotonic()
        while self._takes and self._takes[0] < now - DEMAND_WINDOW:
            self._takes.popleft()
        return min(self.peer.pool_max, self.peer.pool + len(self._takes))

    # --- the task -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    while len(self.ready) + self.opening < self.target:
                        self.opening += 1
                        nursery.start_soon(self._open_one)
                    self._changed = trio.Event()
                    with trio.move_on_after(DEMAND_WINDOW):  # the target shrinks with time
                        await self._changed.wait()
                    if self._backoff:
                        self._retry = trio.Event()
                        with trio.move_on_after(self._backoff):
                            await self._retry.wait()  # the link came back: at once
            finally:
                for entry in self.ready:
                    entry.scope.cancel()  # its watcher stops waiting on the fd first
                    self.links.unwatch_socket(entry.sock)
                    entry.sock.close()
                self.ready.clear()

    async def _open_one(self) -> None:
        sock = None
        try:
            sock = await self._connect()
            await self._handshake(sock)
        except (OSError, PeerGone, peerwire.WireError, trio.TooSlowError) as e:
            if sock is not None:
                sock.close()
            self._failed(e)
        else:
            self.counters.opened += 1
            self._backoff = 0.0
            self._enlist(sock)
        finally:
            self.opening -= 1  # after the connection is counted as ready: no extra opener
            self._changed.set()

    async def _connect(self) -> socket.socket:
        host, port = self.address
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, STREAM)
        try:
            tuning = self.cfg.upstream_tuning(host)
            if self.links.faces(host):
                tuning = self.links.tuning(tuning, host)  # a link leg: its buffers and cc
            apply_tuning(sock, tuning)
            apply_tuning(sock, self._keepalive())
            err = sock.connect_ex((host, port))
            if err and err != errno.EINPROGRESS:
                raise OSError(err, os.strerror(err))
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.counters.connect_failed += 1
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        reset_if_killed(sock)  # if this pep dies, the far end sees an RST, not a flow's end
        return sock

    async def _handshake(self, sock: socket.socket) -> None:
        nonce = os.urandom(peerwire.NONCE_LEN)
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await send_all(sock, peerwire.encode_hello(nonce))
            parsed = peerwire.parse_challenge(await read_exactly(sock, peerwire.CHALLENGE_LEN))
            assert parsed is not None  # a whole message: never "need more"
            challenge = parsed[0]
            expected = peerwire.far_proof(self.secret, nonce, challenge.nonce)
            if not peerwire.verify(expected, challenge.proof):
                self.counters.auth_failed += 1
                raise peerwire.WireError("the far end does not have our key")
            await send_all(sock, peerwire.near_proof(self.secret, nonce, challenge.nonce))
            try:
                peerwire.parse_ready(await read_exactly(sock, len(peerwire.READY)))
            except PeerGone:
                self.counters.auth_failed += 1  # it closes on a proof it does not accept
                raise PeerGone("the far end refused our key") from None

    def _enlist(self, sock: socket.socket) -> None:
        """An authenticated connection joins the ready ones, a watcher on it: a flow may take
        it at once, before the watcher has first run."""
        entry = _Ready(sock)
        self.ready.append(entry)
        self.links.watch_socket(sock)  # its keepalive answers say the link is up
        assert self._nursery is not None
        self._nursery.start_soon(self._watch, entry)

    async def _watch(self, entry: _Ready) -> None:
        """Until taken: readable here means the far end closed, reset or misbehaved."""
        with entry.scope:
            if entry.scope.cancel_called:
                # Taken before this task first ran: the socket is the flow's now, and its relay
                # may be waiting on it. trio allows one reader per fd and checks that before
                # it looks at the cancel scope, so waiting here would raise BusyResourceError
                # and take the pool, and the daemon, down (seen once in CI).
                return
            await trio.lowlevel.wait_readable(entry.sock)
            with contextlib.suppress(ValueError):
                self.ready.remove(entry)
                self.links.unwatch_socket(entry.sock)
                self.counters.died_idle += 1
                abort(entry.sock)
                self._changed.set()

    def _keepalive(self) -> LegTuning:
        """The idle pooled connections' keepalive: the link's heartbeat, else KEEPALIVE."""
        link = self.cfg.link
        if link is None:
            return KEEPALIVE
        beat = link.heartbeat
        return LegTuning(keepalive=True, keepidle=beat, keepintvl=beat, keepcnt=KEEPALIVE.keepcnt)

    def _link_changed(self, up: bool) -> None:
        """The link is back: connections failed while it was down; try again now."""
        if up:
            self._backoff = 0.0
            self._retry.set()
            self._changed.set()

    def _failed(self, error: BaseException) -> None:
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
        if self._log():
            log.warning(
                "peer %s:%d: %s; flows go direct meanwhile, retrying in %.1f s",
                *self.address,
                describe(error),
                self._backoff,
            )

    def snapshot(self) -> dict[str, object]:
        c = self.counters
        return {
            "connect": self.peer.connect,
            "target": self.target,
            "ready": len(self.ready),
            "opening": self.opening,
            "in_use": c.in_use,
            "opened": c.opened,
            "taken": c.taken,
            "fallback": c.fallback,
            "died_idle": c.died_idle,
            "connect_failed": c.connect_failed,
            "auth_failed": c.auth_failed,
        }


def _alive(sock: socket.socket) -> bool:
    """Nothing to read and no error: an idle pooled connection the far end has not closed."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return not p.poll(0)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """pep.split.lifecycle.send_all, a failure being the peer's: PeerGone."""
    try:
        await lifecycle.send_all(sock, data)
    except OSError as e:
        raise PeerGone(f"sending: {describe(e)}") from None


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes; PeerGone on EOF or an error first. Exactly: every message's length is
    known before it is read (pep.peer.wire), and what follows the last one is the flow's own,
    spliced by the relay as it stands in the socket."""
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as e:
            raise PeerGone(f"receiving: {describe(e)}") from None
        if not chunk:
            raise PeerGone("closed by the far end")
        buf += chunk
    return buf
