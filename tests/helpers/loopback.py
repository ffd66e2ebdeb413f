"""Loopback TCP for the unit tests of the connection path: no root, no namespace.

A split connection has four sockets: the client application's, pep's client-side leg, pep's
upstream leg and the server application's. Here each pair is a real TCP connection over
127.0.0.1, so the kernel does what it does on a gateway (FIN, RST, SO_LINGER, splice), only
nearer. pep's sides are plain non-blocking sockets, as pep's own are; the applications' are
trio sockets, for pep.testing.traffic's helpers (send_all, hash_to_eof, read_until_end).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import trio

__all__ = ["App", "aborted", "accept", "free_port", "listening", "tcp_pair"]

App = trio.socket.SocketType
LOCALHOST = "127.0.0.1"


@contextlib.contextmanager
def listening(backlog: int = 16) -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 at a port the kernel picks; closed afterwards."""
    with socket.create_server((LOCALHOST, 0), backlog=backlog) as srv:
        yield srv


async def accept(srv: socket.socket) -> socket.socket:
    """The next connection ``srv`` has, waited for with trio: pep's end (non-blocking)."""
    while True:
        await trio.lowlevel.wait_readable(srv)
        try:
            sock, _ = srv.accept()
        except BlockingIOError:
            continue
        sock.setblocking(False)
        return sock


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for a setting that cannot say "any")."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return int(probe.getsockname()[1])


def tcp_pair() -> tuple[App, socket.socket]:
    """One loopback TCP connection: (an application's end, pep's end, non-blocking)."""
    with listening() as srv:
        app = socket.create_connection(srv.getsockname())
        pep, _ = srv.accept()
    pep.setblocking(False)
    return trio.socket.from_stdlib_socket(app), pep


def aborted(sock: App | socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a peer that crashes or gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
