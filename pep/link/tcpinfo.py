"""``struct tcp_info`` (getsockopt TCP_INFO): the fields pep reads, decoded with struct.

Layout from include/uapi/linux/tcp.h; every field used here exists since Linux 4.19 (bytes_sent
and bytes_retrans came last, in 4.19), but dsack_dups (5.3). The struct only ever grows at its
end, so a shorter answer from an older kernel is padded with zeros rather than refused: a field
the kernel does not have reads as 0.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

__all__ = ["TCP_INFO_LEN", "UNLIMITED", "TcpInfo", "decode", "read"]

# (name, offset, struct format), include/uapi/linux/tcp.h
_FIELDS = (
    ("state", 0, "B"),
    ("ca_state", 1, "B"),
    ("retransmits", 2, "B"),
    ("probes", 3, "B"),
    ("backoff", 4, "B"),
    ("rto_us", 8, "I"),
    ("snd_mss", 16, "I"),
    ("unacked", 24, "I"),
    ("lost", 32, "I"),
    ("retrans", 36, "I"),
    ("last_data_recv_ms", 52, "I"),
    ("last_ack_recv_ms", 56, "I"),
    ("rtt_us", 68, "I"),
    ("snd_cwnd", 80, "I"),
    ("total_retrans", 100, "I"),
    ("pacing_rate", 104, "Q"),
    ("max_pacing_rate", 112, "Q"),
    ("bytes_acked", 120, "Q"),
    ("bytes_received", 128, "Q"),
    ("notsent_bytes", 144, "I"),
    ("min_rtt_us", 148, "I"),
    ("delivery_rate", 160, "Q"),
    ("bytes_sent", 200, "Q"),
    ("bytes_retrans", 208, "Q"),
    ("dsack_dups", 216, "I"),  # 5.3
)
TCP_INFO_LEN = 232  # up to and including tcpi_snd_wnd (5.4); enough for every field above


class TcpInfo(NamedTuple):
    state: int
    ca_state: int
    retransmits: int  # RTOs in a row without an ACK that advanced (icsk_retransmits)
    probes: int  # keepalive or zero-window probes unanswered (icsk_probes_out)
    backoff: int  # RTO doublings in force
    rto_us: int
    snd_mss: int
    unacked: int  # segments in flight
    lost: int
    retrans: int
    last_data_recv_ms: int  # since data last arrived
    last_ack_recv_ms: int  # since an ACK (a keepalive's answer too) last arrived
    rtt_us: int
    snd_cwnd: int  # segments
    total_retrans: int  # segments retransmitted over the connection's life
    pacing_rate: int  # bytes/s
    max_pacing_rate: int  # bytes/s; 2^64-1 = unlimited
    bytes_acked: int
    bytes_received: int
    notsent_bytes: int  # written by the application, not yet sent
    min_rtt_us: int
    delivery_rate: int  # bytes/s
    bytes_sent: int  # including retransmissions
    bytes_retrans: int
    dsack_dups: int  # segments the receiver reported as duplicates (D-SACK): spurious resends


def _build() -> struct.Struct:
    fmt, pos = "=", 0
    for _, off, code in _FIELDS:
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += code
        pos = off + struct.calcsize("=" + code)
    return struct.Struct(fmt)


_LAYOUT = _build()
UNLIMITED = 2**64 - 1


def decode(raw: bytes) -> TcpInfo:
    """Decode a TCP_INFO answer; a short one (an older kernel) is zero-padded."""
    if len(raw) < _LAYOUT.size:
        raw = raw + bytes(_LAYOUT.size - len(raw))
    return TcpInfo(*_LAYOUT.unpack_from(raw))


def read(sock: socket.socket) -> TcpInfo:
    """getsockopt(TCP_INFO) (raises OSError once the socket is closed)."""
    return decode(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN))
