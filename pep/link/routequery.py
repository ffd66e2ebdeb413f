"""Which interface the kernel routes an address through: one RTM_GETROUTE, asked per new
address and remembered for a few seconds.

pep asks this for every split connection with ``[link]`` set (does the upstream leg, or the
client leg, cross the link?), so the answer must be cheap: pyroute2's ``route("get")`` took
441 us per call here (docs/DESIGN.md), more than pep's whole per-connection budget. The request
and the one attribute read from the answer are packed and parsed with struct, as
pep.capture.nfq_codec does for the queue (rtnetlink layout: include/uapi/linux/rtnetlink.h); the
kernel does the lookup itself, so policy rules and every table count as they do for the
connection.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable

from pep.support import netlink
from pep.support.memo import Remembered

__all__ = ["RouteCache", "decode_oif", "encode_get"]

RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLM_F_REQUEST = 1
RTA_DST, RTA_OIF = 1, 4
_NLMSGHDR = netlink.HEADER
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")  # len, type


def encode_get(family: int, packed_addr: bytes, seq: int) -> bytes:
    """RTM_GETROUTE for one host address (``ip route get ADDR``)."""
    rta = _RTATTR.pack(_RTATTR.size + len(packed_addr), RTA_DST) + packed_addr
    body = _RTMSG.pack(family, len(packed_addr) * 8, 0, 0, 0, 0, 0, 0, 0) + rta
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def decode_oif(buf: bytes, seq: int) -> int | None:
    """The output interface index from the answer to request ``seq``; None when the address
    is unreachable (an NLMSG_ERROR) or the answer names no interface. Messages of other
    sequence numbers (a late answer to an earlier request) are skipped; a truncated or
    malformed buffer yields None rather than an exception."""
    for msg in netlink.walk(buf):
        if isinstance(msg, str):
            return None  # truncated or malformed
        mtype, mseq, start, end = msg
        if mseq == seq:
            if mtype == RTM_NEWROUTE:
                return _oif(buf, start + _RTMSG.size, end)
            return None  # NLMSG_ERROR (unreachable, no route) or anything else
    return None


def _oif(buf: bytes, pos: int, end: int) -> int | None:
    while pos + _RTATTR.size <= end:
        alen, atype = _RTATTR.unpack_from(buf, pos)
        if alen < _RTATTR.size or pos + alen > end:
            return None
        if atype == RTA_OIF and alen >= _RTATTR.size + 4:
            return struct.unpack_from("=I", buf, pos + _RTATTR.size)[0]
        pos += netlink.align(alen)
    return None


class RouteCache:
    """``oif(address)``, asking the kernel once per address per ``ttl`` seconds (pep.support.memo):
    a route change is seen within ``ttl``."""

    def __init__(
        self, ttl: float = 5.0, size: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.oif: Remembered[int | None] = Remembered(self._ask, ttl, size, clock)
        self._sock: socket.socket | None = None
        self._seq = 0
        self.asked = 0  # lookups that went to the kernel (the rest were remembered)

    def forget(self) -> None:
        """Routes changed (pep itself changed them): ask again from now on."""
        self.oif.forget()

    def _ask(self, host: str) -> int | None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC)
            self._sock.settimeout(1.0)  # the kernel answers within the send; never hang
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self.asked += 1
        try:
            self._sock.send(encode_get(family, socket.inet_pton(family, host), self._seq))
            while True:
                buf = self._sock.recv(8192)
                if _answers(buf, self._seq):
                    return decode_oif(buf, self._seq)
        except OSError as e:
            if e.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, None):
                self.close()  # a broken socket: a new one next time
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _answers(buf: bytes, seq: int) -> bool:
    """Whether ``buf`` holds the answer to ``seq`` (an earlier request's late answer does not)."""
    return any(not isinstance(msg, str) and msg[1] == seq for msg in netlink.walk(buf))
