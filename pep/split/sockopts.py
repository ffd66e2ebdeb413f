"""Per-leg socket options, applied the same way to the client leg and the upstream leg (how a
leg's socket is closed: pep.split.lifecycle)."""

from __future__ import annotations

import errno
import logging
import socket

from pep.config import LegTuning

__all__ = [
    "STREAM",
    "apply_tuning",
    "mirror_syn",
    "restart_congestion",
    "set_rto_max",
    "transparent",
]

log = logging.getLogger(__name__)

# The type of every socket pep opens: non-blocking for trio's waits, not inherited by the
# iptables helper processes.
STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)  # include/uapi/linux/tcp.h
TCP_NOTSENT_LOWAT = 25  # include/uapi/linux/tcp.h
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # include/uapi/linux/tcp.h
TCP_RTO_MAX_MS = 44  # include/uapi/linux/tcp.h (Linux 6.15)
IP_TRANSPARENT = 19  # include/uapi/linux/in.h
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # include/uapi/asm-generic/socket.h
IPV6_TRANSPARENT = 75  # include/uapi/linux/in6.h


def apply_tuning(sock: socket.socket, tuning: LegTuning) -> None:
    """Set one leg's socket options. Buffers set before connect() also size the window scale."""
    if tuning.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tuning.sndbuf is not None:
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, tuning.sndbuf)
    if tuning.rcvbuf is not None:
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, tuning.rcvbuf)
    if tuning.congestion is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, tuning.congestion.encode())
    if tuning.quickack:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    if tuning.notsent_lowat is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, tuning.notsent_lowat)
    if tuning.keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (
            (socket.TCP_KEEPIDLE, tuning.keepidle),
            (socket.TCP_KEEPINTVL, tuning.keepintvl),
            (socket.TCP_KEEPCNT, tuning.keepcnt),
        ):
            if value is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    if tuning.user_timeout is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, round(tuning.user_timeout * 1000))
    if tuning.rto_max is not None:
        set_rto_max(sock, tuning.rto_max)


def set_rto_max(sock: socket.socket, seconds: float) -> bool:
    """TCP_RTO_MAX_MS; False (and one warning per process) on a kernel older than 6.15, where
    a leg's retransmission timeout keeps backing off up to the kernel's 120 s."""
    global _rto_max_missing
    if _rto_max_missing:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, round(seconds * 1000))
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        _rto_max_missing = True
        log.warning(
            "this kernel has no TCP_RTO_MAX_MS (Linux 6.15+): after a link outage, link legs "
            "retransmit only when their backed-off RTO (up to 120 s) expires"
        )
        return False
    return True


_rto_max_missing = False


def restart_congestion(sock: socket.socket, only: bytes | None = None) -> bool:
    """Start a connection's congestion control afresh, as a new connection's would be, keeping
    what TCP itself kept: the measured RTT, cwnd, both windows. ``only``: restart only this
    module (e.g. b"bbr"). Returns whether it restarted.

    Why: BBR's min-RTT filter lasts 10 s (tcp_bbr.c, bbr_min_rtt_win_sec); past that, the
    next ACKs take it into PROBE_RTT, cwnd 4 packets for at least 200 ms and a round trip.
    An idle pooled connection's state is stale that way, and a request/response flow (a TLS
    handshake, then the response) paid one whole extra link RTT (measured on GEO: HTTPS
    100 KB 1.85 s instead of 1.25 s); a link leg sending for longer than 10 s pays the same
    round trip of near silence (pep.link.pacer refreshes those). Setting the module anew runs
    its init (for BBR: STARTUP, its min RTT taken from TCP's own 5-minute minimum and stamped
    now, pacing from srtt and cwnd, still capped by SO_MAX_PACING_RATE); setting the same
    name is a no-op in the kernel, so the socket passes through reno, which has no state.
    """
    try:
        name = sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).split(b"\0", 1)[0]
        if name in (b"", b"reno") or (only is not None and name != only):
            return False
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, b"reno")
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, name)
    except OSError:
        return False  # the connection died meanwhile: the flow's next send says so
    return True


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """The size asked for: SO_SNDBUF/SO_RCVBUF alone are capped at net.core.wmem_max/rmem_max
    (212992 by default), far below a satellite link's BDP; the FORCE variants (CAP_NET_ADMIN,
    which pep runs with) are not. Without the capability, the capped size is what there is."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def mirror_syn(sock: socket.socket, tos: int | None, mss: int | None) -> None:
    """Carry the client SYN's TOS/traffic class and MSS onto the upstream leg.

    The MSS is clamped before connect() (TCP_MAXSEG on an unconnected socket caps the MSS it
    announces and uses), so the upstream leg never sends segments the client's path would
    not take. The kernel ignores values below its minimum (TCP_MIN_MSS 88).
    """
    if tos is not None:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    if mss is not None and mss >= 88:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)


def transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT: accept TPROXY'd connections / bind a non-local (client) address."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
