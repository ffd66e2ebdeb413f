"""The client-side leg's front door: the listening sockets and the accept loop.

Each accepted client gets its own task, the session (pep.split.session). Out of descriptors, a
waiting client is reset at once instead of left hanging in the backlog (``_refuse_one``).

One listening socket per IP version (IPv6 with IPV6_V6ONLY), rather than one dual-stack
socket: IPv4 clients then appear with their plain addresses, as the SYN reader recorded them,
and each family's SO_ORIGINAL_DST is asked at its own level.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import socket

import trio

from pep.config import Config, LegTuning
from pep.split.lifecycle import abort, reset_if_killed
from pep.split.session import Sessions
from pep.split.sockopts import STREAM, apply_tuning, transparent
from pep.support.errors import describe
from pep.support.ratelog import Every

__all__ = ["ACCEPT_BACKOFF", "ACCEPT_CAPACITY_ERRNOS", "Listener", "listener_tuning"]

log = logging.getLogger(__name__)

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
# Clients accepted per wake-up of a listener before the connections already accepted get to
# run: saves a scheduler round trip per client under load, bounds the delay it adds to them.
_ACCEPT_BATCH = 16
# accept(2) errors that say the system is short of a resource, not that a client failed: the
# client stays in the backlog, and the listener stays readable, so accepting again at once
# would spin. The same set as trio's ACCEPT_CAPACITY_ERRNOS (trio/_highlevel_serve_listeners.py).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Of those, out of descriptors: a waiting client can still be refused (``_refuse_one``).
_NO_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
# How long accepting pauses after one of them: trio's SLEEP_TIME in the same file (100 ms).
ACCEPT_BACKOFF = 0.1
LOG_EVERY = 10.0  # seconds: at most one line about descriptors running out per this long
# accept(2) errors for a client that gave up between its handshake and our accept (Linux
# accept(2), ERRORS: ECONNABORTED; EPROTO "protocol error"; EPERM "firewall rules forbid
# connection"): nothing to do, the next client may be waiting.
_ACCEPT_GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


def listener_tuning(cfg: Config) -> LegTuning:
    """The listening sockets' options. Accepted sockets inherit the buffers, and the receive
    buffer in place when the SYN arrives caps the initial window the SYN-ACK offers (with
    initrwnd): so when connections arrive on the link, the link's buffers go on the listener.
    Congestion control is set per accepted link leg (pep.split.session), not inherited by all."""
    if cfg.link is None or not cfg.link.arrives_on(cfg.interfaces):
        return cfg.client
    link = cfg.link.leg_tuning(cfg.client)
    return dataclasses.replace(cfg.client, sndbuf=link.sndbuf, rcvbuf=link.rcvbuf)


def _reserve_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Listener:
    """Owns the listening sockets; every connection runs as a task in the caller's nursery.

    ``cfg`` is the configuration at start. A reload retunes the sockets' client leg
    (pep.ops.reload.retune_listener); the rest the listener reads (port, families, backlog, mode,
    Fast Open) is restart-only, and the sessions read the running config per connection.
    """

    def __init__(self, cfg: Config, sessions: Sessions) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.counters = sessions.counters  # accepts are counted with the sessions' outcomes
        self._session = sessions.run  # one bound method for all: started per client
        self.socks = [self._socket(_FAMILY[f]) for f in cfg.families]
        # One descriptor held back: out of descriptors, it is freed to accept and reset a
        # waiting client (see _refuse_one).
        self._reserve = _reserve_fd()
        self._log_no_fd = Every(LOG_EVERY)  # out of descriptors: one line per LOG_EVERY

    def _socket(self, family: int) -> socket.socket:
        sock = socket.socket(family, STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.cfg.workers > 1:  # each worker binds its own socket on the port (pep.ops.workers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.cfg.mode == "tproxy":
            transparent(sock)
        # Accepted sockets inherit buffers, congestion control and TCP_NODELAY from the
        # listener; buffers must be set here to count in the window scale of the SYN-ACK.
        apply_tuning(sock, listener_tuning(self.cfg))
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
                    e.errno, f"cannot listen on [{host}]:{self.cfg.listen_port}: {describe(e)}"
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
        await nursery.start(self.sessions.relayer.run)
        async with trio.open_nursery() as accepting:
            for sock in self.socks:
                accepting.start_soon(self._accept_loop, sock, nursery)

    async def _accept_loop(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Accept every waiting client per wake-up (up to ``_ACCEPT_BATCH``), each handled by
        its own task; plain sockets, as in pep.split.upstream."""
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
                if e.errno in _NO_FD_ERRNOS and await self._refuse_one(sock):
                    return True
                if e.errno in ACCEPT_CAPACITY_ERRNOS:
                    log.warning("accept: %s; pausing %.0f ms", describe(e), ACCEPT_BACKOFF * 1e3)
                    await trio.sleep(ACCEPT_BACKOFF)
                    return False
                if e.errno in _ACCEPT_GONE_ERRNOS:
                    continue
                raise
            client.setblocking(False)  # accept4() does not pass O_NONBLOCK on
            self.counters.accepted += 1
            nursery.start_soon(self._session, client)
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
        if self._log_no_fd():
            log.warning(
                "out of file descriptors: resetting waiting clients (%d so far); new flows "
                "bypass pep until descriptors free",
                self.counters.refused_no_fd,
            )
        return True
