"""Per-leg socket options, applied the same way to the client leg and the upstream leg."""

from __future__ import annotations

import socket

import trio

from pep.config import LegTuning

__all__ = ["apply_tuning", "transparent"]

TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)  # include/uapi/linux/tcp.h
IP_TRANSPARENT = 19  # include/uapi/linux/in.h
IPV6_TRANSPARENT = 75  # include/uapi/linux/in6.h


def apply_tuning(sock: trio.socket.SocketType, tuning: LegTuning) -> None:
    """Set one leg's socket options. Buffers set before connect() also size the window scale."""
    if tuning.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tuning.sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tuning.sndbuf)
    if tuning.rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tuning.rcvbuf)
    if tuning.congestion is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, tuning.congestion.encode())


def transparent(sock: trio.socket.SocketType) -> None:
    """IP_TRANSPARENT: accept TPROXY'd connections / bind a non-local (client) address."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
