"""Parse a queued TCP SYN: the flow's addresses, ports, and the options its client asked for.

Pure, and total: parse_syn returns a result for any bytes and never raises. The SYN reader
runs it on every queued packet, and an exception there would stop verdicts for every flow; a
packet we cannot read is instead a NotSyn with a reason, which the reader accepts unsplit.

The input is an NFQUEUE payload, so it starts at the IP header and may be cut short by the
queue's copy range: the IP and TCP headers (with options) must be present, the data need not.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

__all__ = ["NotSyn", "SynInfo", "parse_syn"]


@dataclass(frozen=True, slots=True)
class SynInfo:
    family: int  # 4 or 6
    # Addresses are inet_ntop text, the form socket.accept() reports, so the flow table's keys
    # match what the listener sees (Python 3.11's ipaddress writes v4-mapped ones differently).
    src: str
    sport: int
    dst: str
    dport: int
    tos: int  # IPv4 TOS byte / IPv6 traffic class
    ttl: int  # IPv4 TTL / IPv6 hop limit
    mss: int | None
    wscale: int | None  # as sent (the kernel clamps values > 14 to 14)
    sack_permitted: bool
    timestamps: tuple[int, int] | None  # (TSval, TSecr)


@dataclass(frozen=True, slots=True)
class NotSyn:
    reason: str


_IPV4 = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl, tos, total length, id, frag, ttl, proto, csum
_IPV6 = struct.Struct("!IHBB16s16s")  # ver/tc/flow, payload length, next header, hop limit
_TCP = struct.Struct("!HHIIHHHH")  # sport, dport, seq, ack, doff/flags, window, csum, urg
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")

_PROTO_TCP = 6
_IP_MF = 0x2000
_IP_OFFSET = 0x1FFF

# IPv6 extension headers sized in 8-octet units beyond the first 8 (RFC 8200 4.3, 4.4, 4.6)
_EXT_8 = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_EXT_FRAGMENT = 44
_EXT_AH = 51  # sized in 4-octet units beyond the first 8 (RFC 4302 2.2)
_EXT_ESP = 50
_EXT_NONE = 59
# Real stacks send at most a few; the bound keeps a crafted chain from costing more.
_MAX_EXT_HEADERS = 8

_TH_FIN = 0x01
_TH_SYN = 0x02
_TH_RST = 0x04
_TH_ACK = 0x10

_TCPOPT_EOL = 0
_TCPOPT_NOP = 1
_TCPOPT_MSS = 2
_TCPOPT_WINDOW = 3
_TCPOPT_SACK_PERM = 4
_TCPOPT_TIMESTAMP = 8

_ntop = socket.inet_ntop
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6


def parse_syn(packet: bytes | bytearray | memoryview) -> SynInfo | NotSyn:
    """Read a SYN (SYN set, ACK/RST/FIN clear) starting at its IP header."""
    p = packet if type(packet) is bytes else bytes(packet)
    n = len(p)
    if n == 0:
        return NotSyn("empty packet")
    version = p[0] >> 4
    if version == 4:
        if n < 20:
            return NotSyn(f"truncated IPv4 header ({n} bytes)")
        vihl, tos, total, _id, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(p)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20:
            return NotSyn(f"bad IPv4 header length {ihl}")
        if ihl > n:
            return NotSyn("truncated IPv4 options")
        if total < ihl:
            return NotSyn(f"bad IPv4 total length {total}")
        if frag & (_IP_MF | _IP_OFFSET):
            return NotSyn("fragment")
        if proto != _PROTO_TCP:
            return NotSyn(f"not TCP (protocol {proto})")
        # Bytes past the total length are not part of the datagram; fewer bytes than it are
        # the copy range at work.
        limit = min(n, total)
        off = ihl
        family, af = 4, _AF_INET
    elif version == 6:
        if n < 40:
            return NotSyn(f"truncated IPv6 header ({n} bytes)")
        vtcfl, plen, nxt, ttl, src, dst = _IPV6.unpack_from(p)
        tos = (vtcfl >> 20) & 0xFF
        # Payload length 0 means a jumbogram (or BIG TCP): no usable bound but the capture.
        limit = min(n, 40 + plen) if plen else n
        off = 40
        for _ in range(_MAX_EXT_HEADERS + 1):
            if nxt == _PROTO_TCP:
                break
            if nxt in _EXT_8 or nxt == _EXT_AH:
                if off + 2 > limit:
                    return NotSyn(f"truncated IPv6 extension header {nxt}")
                size = (p[off + 1] + 1) * 8 if nxt != _EXT_AH else (p[off + 1] + 2) * 4
                nxt = p[off]
                off += size
            elif nxt == _EXT_FRAGMENT:
                return NotSyn("fragment")
            elif nxt == _EXT_ESP:
                return NotSyn("ESP-encrypted (next header 50)")
            elif nxt == _EXT_NONE:
                return NotSyn("no next header (59)")
            else:
                return NotSyn(f"not TCP (next header {nxt})")
        else:
            return NotSyn(f"more than {_MAX_EXT_HEADERS} IPv6 extension headers")
        family, af = 6, _AF_INET6
    else:
        return NotSyn(f"not IP (version {version})")

    if off + 20 > limit:
        return NotSyn("truncated TCP header")
    sport, dport, _seq, _ack, doff_flags, _win, _csum, _urg = _TCP.unpack_from(p, off)
    flags = doff_flags & 0x1FF
    if flags & (_TH_SYN | _TH_ACK | _TH_RST | _TH_FIN) != _TH_SYN:
        # SYN-ACKs are replies; SYN+RST and SYN+FIN are discarded by a listening socket
        # (net/ipv4/tcp_input.c, tcp_rcv_state_process), so none of these opens a flow.
        return NotSyn(f"not a SYN (flags 0x{flags:02x})")
    doff = (doff_flags >> 12) * 4
    if doff < 20:
        return NotSyn(f"bad TCP data offset {doff}")
    end = off + doff
    if end > limit:
        return NotSyn("truncated TCP options")

    mss: int | None = None
    wscale: int | None = None
    sack = False
    ts: tuple[int, int] | None = None
    i = off + 20
    while i < end:
        kind = p[i]
        if kind == _TCPOPT_EOL:
            break
        if kind == _TCPOPT_NOP:
            i += 1
            continue
        if i + 2 > end:
            return NotSyn("malformed TCP options")
        olen = p[i + 1]
        if olen < 2 or i + olen > end:
            # The kernel stops reading options here and keeps what it had (tcp_parse_options),
            # so the connection still opens, with options we cannot tell. Not splitting it is
            # the safe answer: unsplit, it works end to end.
            return NotSyn("malformed TCP options")
        # A known kind with the wrong length is skipped, as tcp_parse_options does.
        if kind == _TCPOPT_MSS:
            if olen == 4:
                (mss,) = _U16.unpack_from(p, i + 2)
        elif kind == _TCPOPT_WINDOW:
            if olen == 3:
                wscale = p[i + 2]
        elif kind == _TCPOPT_SACK_PERM:
            if olen == 2:
                sack = True
        elif kind == _TCPOPT_TIMESTAMP and olen == 10:
            ts = _U32X2.unpack_from(p, i + 2)
        i += olen

    return SynInfo(
        family, _ntop(af, src), sport, _ntop(af, dst), dport, tos, ttl, mss, wscale, sack, ts
    )
