"""The server-side leg: a tuned connection to the original destination.

The connect is bounded by ``connect_timeout``; a refusal or timeout is reported as an
``UpstreamError`` so the listener can reset the client at once (a client left hanging on a
half-open split connection is worse than the server's own refusal).
"""

from __future__ import annotations

import contextlib
import errno
import socket

import trio

from pep.config import LegTuning
from pep.tuning import apply_tuning

__all__ = ["UpstreamError", "connect"]


class UpstreamError(Exception):
    """The original destination could not be reached; ``reason`` is a short label for logs."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


async def connect(
    dst: tuple[str, int], tuning: LegTuning, timeout: float
) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ok = False
    try:
        apply_tuning(sock, tuning)
        with trio.move_on_after(timeout):
            await sock.connect(dst)
            ok = True
            return sock
        raise UpstreamError("connect timeout")
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        raise UpstreamError(f"connect failed: {name}") from None
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                sock.close()
