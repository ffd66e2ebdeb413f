"""The server-side leg: a tuned connection to the original destination.

The connect is bounded by ``connect_timeout``; a refusal or timeout is reported as an
``UpstreamError`` so the listener can reset the client at once (a client left hanging on a
half-open split connection is worse than the server's own refusal).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

import trio

from pep.capture.preconnect import UpstreamError
from pep.capture.syn import SynInfo
from pep.config import Config, LegTuning
from pep.split.hooks import NO_LINK, LinkSide, patiently
from pep.split.sockopts import STREAM, apply_tuning, mirror_syn, transparent

__all__ = ["UpstreamError", "connect", "open_for"]

TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)  # include/uapi/linux/tcp.h


async def connect(
    dst: tuple[str, int],
    tuning: LegTuning,
    timeout: float,
    first_bytes: bytes = b"",
    source: tuple[str, int] | None = None,
    tos: int | None = None,
    mss: int | None = None,
    link: LinkSide = NO_LINK,
) -> socket.socket:
    """Connect to ``dst``; with ``first_bytes``, carry them in the SYN (TCP Fast Open).

    ``timeout`` counts only while ``link`` is up, up to its outage_timeout (``patiently``):
    a connect across a satellite link that fades meanwhile waits for it to come back instead
    of giving up after a timeout meant for a LAN; the kernel keeps resending the SYN, every
    RTO cap at most (pep.config.link).

    TCP_FASTOPEN_CONNECT (Linux 4.11) defers the SYN to the first write, so the client's
    request crosses a satellite link with the handshake instead of one round trip after it
    (RFC 7413). Without first bytes (server-speaks-first protocols) the connect is ordinary.
    Either way the call returns only once the connection is established or has failed.

    ``source`` (full transparency, TPROXY mode) binds the client's own address and port with
    IP_TRANSPARENT, so the server sees the client; its replies are routed back to this socket
    by the DIVERT rule (``-m socket --transparent``) and pep's policy route.

    A plain non-blocking socket, with trio only to wait: the connection's sockets are used by
    one task at a time (pep.split.relay), so trio's socket wrapper would add a scheduler round trip
    per call and nothing else.
    """
    family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
    sock = socket.socket(family, STREAM)
    ok = False
    try:
        apply_tuning(sock, tuning)
        mirror_syn(sock, tos, mss)
        if source is not None:
            transparent(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(source)  # numeric: no resolver call
        if first_bytes:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        err = sock.connect_ex(dst)  # 0 at once when the SYN is deferred (Fast Open)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        if first_bytes or not _established(sock):
            try:
                await patiently(_Handshake(sock, first_bytes).wait, timeout, link)
            except trio.TooSlowError:
                raise UpstreamError("connect timeout") from None
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        ok = True
        return sock
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        raise UpstreamError(f"connect failed: {name}") from None
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                sock.close()


class _Handshake:
    """Send the Fast Open bytes (the first write sends SYN+data; more waits for the
    handshake), then wait for the handshake to complete or fail: a SYN_SENT socket is not
    writable. ``wait`` may be cancelled and awaited again: what was sent stays sent."""

    def __init__(self, sock: socket.socket, first_bytes: bytes) -> None:
        self.sock, self.left = sock, memoryview(first_bytes)

    async def wait(self) -> None:
        while self.left:
            try:
                self.left = self.left[self.sock.send(self.left) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
        await trio.lowlevel.wait_writable(self.sock)


def _established(sock: socket.socket) -> bool:
    """Whether the handshake already completed within connect(): to a server on this host
    or a veth away the kernel processes the SYN-ACK before the syscall returns, and a trip
    through trio's scheduler to learn it would cost more than the check."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def open_for(
    cfg: Config,
    dst: tuple[str, int],
    client: tuple[str, int],
    syn: SynInfo | None,
    first_bytes: bytes = b"",
    timeout: float | None = None,
    links: LinkSide = NO_LINK,
) -> socket.socket:
    """The upstream leg for one split flow, as configured: the per-destination tuning (the
    link's buffers and congestion control underneath, when the destination is routed through
    the link: ``links``), the client's address as source (``transparent_source``), and the
    client SYN's TOS and MSS (``mirror_tos``, ``mirror_mss``) when the SYN reader recorded it."""
    tuning = cfg.upstream_tuning(dst[0])
    link = NO_LINK
    if links.faces(dst[0]):
        tuning = links.tuning(tuning, dst[0])
        link = links
    give_up = trio.current_time() + link.hold
    while True:
        down_before = link.down_time()
        try:
            return await connect(
                dst,
                tuning,
                cfg.connect_timeout if timeout is None else timeout,
                first_bytes,
                source=client if cfg.transparent_source else None,
                tos=syn.tos if syn is not None and cfg.mirror_tos else None,
                mss=syn.mss if syn is not None and cfg.mirror_mss else None,
                link=link,
            )
        except UpstreamError as e:
            # The kernel gave up resending the SYN (tcp_syn_retries: a few seconds with the
            # link's RTO cap) while the link was down: not the destination's answer. Again,
            # until the link has been waited for as long as outage_timeout allows.
            faded = link.down or link.down_time() > down_before
            if "ETIMEDOUT" not in e.reason or not faded or trio.current_time() >= give_up:
                raise
