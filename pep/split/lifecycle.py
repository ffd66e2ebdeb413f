"""A split connection's sockets from pep's hands to the kernel's: how each is written to while
pep owns it and how it is closed, so that neither peer ever takes a transfer cut short for a
complete one (FIN after every byte on a clean end, RST on every other).
"""

from __future__ import annotations

import socket
import struct

import trio

__all__ = ["abort", "close_gracefully", "reset_if_killed", "send_all"]

_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}: close = RST
_LINGER_DEFAULT = struct.pack("ii", 0, 0)  # l_onoff 0: close sends a FIN after the data


def _set_linger(sock: socket.socket, linger: bytes) -> None:
    """SO_LINGER, where a socket already reset by its peer is no error. A try, not
    contextlib.suppress: this runs four times per connection (see reset_if_killed)."""
    try:  # noqa: SIM105
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    except OSError:
        pass


def reset_if_killed(sock: socket.socket) -> None:
    """SO_LINGER 0 for as long as pep owns a split connection's socket: if the process dies
    (kill -9, the OOM killer), the kernel closes the socket with an RST, so neither peer takes
    a transfer cut short for a complete one (a plain close would send a FIN after the data
    already sent). Every orderly close must go through ``close_gracefully``: with SO_LINGER 0,
    close() discards data not yet sent."""
    _set_linger(sock, _LINGER_RESET)


def close_gracefully(*socks: socket.socket) -> None:
    """Close with a FIN after every byte already written (undoes ``reset_if_killed``)."""
    for sock in socks:
        _set_linger(sock, _LINGER_DEFAULT)
        sock.close()


def abort(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), so the peer sees a failure, not an orderly EOF."""
    reset_if_killed(sock)  # SO_LINGER 0
    sock.close()


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting with trio while it is full
    (OSError as the socket raises it)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
