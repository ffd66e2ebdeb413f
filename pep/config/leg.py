"""``LegTuning``: the socket options of one leg of a split connection (``[client]``,
``[upstream]``, ``[[upstream_override]]``), declared once for every table that sets them."""

from __future__ import annotations

from dataclasses import dataclass

from pep.config.schema import boolean, congestion, integer, key, seconds

__all__ = ["LegTuning"]

_BUFFER = integer(4096, 1 << 30)


@dataclass(frozen=True, slots=True)
class LegTuning:
    """Socket options for one leg of a split connection (client side or upstream side).

    ``None`` means "leave the kernel's default": the sysctls (tcp_rmem/tcp_wmem autotuning,
    tcp_congestion_control) usually know better than a fixed number.
    """

    nodelay: bool = key(True, boolean)  # a relay must not add Nagle delay to the sender's own
    sndbuf: int | None = key(None, _BUFFER)
    rcvbuf: int | None = key(None, _BUFFER)
    congestion: str | None = key(None, congestion)
    quickack: bool = key(False, boolean)  # TCP_QUICKACK: ack at once instead of delayed ACKs
    # TCP_NOTSENT_LOWAT: cap on unsent bytes queued in the socket, so a slow leg holds less
    # data in the kernel (Linux default: unlimited, /proc/sys/net/ipv4/tcp_notsent_lowat).
    notsent_lowat: int | None = key(None, integer(1, 1 << 30))
    # SO_KEEPALIVE with TCP_KEEPIDLE/INTVL/CNT (kernel defaults 7200 s / 75 s / 9 probes);
    # the bounds are MAX_TCP_KEEPIDLE/KEEPINTVL/KEEPCNT of include/net/tcp.h.
    keepalive: bool = key(False, boolean)
    keepidle: int | None = key(None, integer(1, 32767))
    keepintvl: int | None = key(None, integer(1, 32767))
    keepcnt: int | None = key(None, integer(1, 127))
    # TCP_USER_TIMEOUT, seconds: how long sent data may stay unacknowledged (and, with
    # keepalive, how long an idle connection may go unanswered) before the kernel gives up on
    # the connection. Kernel default: the retransmission count, tcp_retries2 (about 15 min).
    # [link] sets it on link legs from outage_timeout, so a fade does not end them.
    user_timeout: float | None = key(None, seconds(0.001, 86400.0))
    # TCP_RTO_MAX_MS (Linux 6.15+), seconds: the longest the retransmission timeout backs off
    # to. The kernel accepts 1-120 s (the tcp_rto_max_ms sysctl's range; its default 120 s).
    # [link] caps link legs' so that a leg retransmits within about that long of the link's
    # return after an outage, instead of waiting out a doubled RTO of up to 2 minutes.
    rto_max: float | None = key(None, seconds(1.0, 120.0))
