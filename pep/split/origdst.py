"""Where an accepted client was going, and the loop guard: pep is never an open proxy.

The original destination comes from the kernel: in REDIRECT mode from conntrack
(SO_ORIGINAL_DST), in TPROXY mode it is the accepted socket's own address. A connection that
was not redirected, i.e. whose original destination is the listener itself, has none: the
session closes it at once. The loop guard refuses a redirected connection whose destination
is one of the gateway's own addresses (``LocalAddresses``): pep must not become a relay into
the gateway's own services, nor connect to itself.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

from pep.support.memo import Remembered

__all__ = ["LocalAddresses", "OriginalDst", "is_local_address", "original_dst"]

SO_ORIGINAL_DST = 80  # include/uapi/linux/netfilter_ipv4.h (IP6T_SO_ORIGINAL_DST is 80 too)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # sin_family (host order, skipped), port, addr
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, addr, scope id


def original_dst(sock: socket.socket, family: int) -> tuple[str, int] | None:
    """The pre-NAT destination from conntrack, or None when conntrack has no entry for it.
    (``family`` is the caller's to give: ``sock.family`` builds an enum on every read.)"""
    if family == socket.AF_INET6:
        level, layout = socket.IPPROTO_IPV6, _SOCKADDR_IN6
    else:
        level, layout = socket.SOL_IP, _SOCKADDR_IN
    try:
        raw = sock.getsockopt(level, SO_ORIGINAL_DST, layout.size)
    except OSError:
        return None  # ENOENT: not tracked, so certainly not redirected by us
    port, addr = layout.unpack(raw)
    return socket.inet_ntop(family, addr), port


def is_local_address(host: str) -> bool:
    """Whether ``host`` is one of this namespace's own addresses (bind() without
    IP_TRANSPARENT succeeds only for those)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


class LocalAddresses(Remembered[bool]):
    """``is_local_address``, remembered for ``ttl`` seconds per address: the loop guard's
    memory (``host in local``). The loop guard asks for every connection, and three syscalls
    per connection buy nothing when a gateway's addresses change a few times a day: an address
    added is guarded within ``ttl`` (pep.support.memo)."""

    def __init__(
        self, ttl: float = 1.0, size: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(is_local_address, ttl, size, clock)

    __contains__ = Remembered.__call__


class OriginalDst:
    """The original destination of each accepted client, for one listener's mode and port.

    Both are restart-only settings (pep.ops.reload.RELOADABLE lists neither), so they are read
    once here rather than from the running config per connection.
    """

    def __init__(self, mode: str, listen_port: int, local: LocalAddresses) -> None:
        self.tproxy = mode == "tproxy"
        self.listen_port = listen_port
        self.local = local

    def lookup(self, client: socket.socket, local: tuple[str, int]) -> tuple[str, int] | None:
        """Where ``client`` (accepted on ``local``) was going, or None when it came to the
        listener itself."""
        if self.tproxy:
            # A TPROXY'd socket's own address is the original destination. Only a direct
            # connection has our port on one of our own addresses: the queue rule never marks
            # SYNs for local addresses, so those are never TPROXY'd.
            dst = (local[0], local[1])
            if dst[1] == self.listen_port and dst[0] in self.local:
                return None
            return dst
        dst = original_dst(client, socket.AF_INET6 if ":" in local[0] else socket.AF_INET)
        return None if dst is None or dst == (local[0], local[1]) else dst
