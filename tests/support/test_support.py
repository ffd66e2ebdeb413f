"""pep.support: the remembered lookup's neighbours, the log limiter and the netlink walker."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pep.support import netlink
from pep.support.ratelog import Every


def test_every_says_yes_once_per_period_per_kind() -> None:
    now = [100.0]
    every = Every(10.0, clock=lambda: now[0])
    assert every("scan") and not every("scan")
    assert every("auth")  # another kind has its own period
    now[0] += 9.9
    assert not every("scan")
    now[0] += 0.1
    assert every("scan") and not every("scan")
    assert every()  # no kind: one period for all


def _msg(mtype: int, seq: int, payload: bytes) -> bytes:
    head = netlink.HEADER.pack(netlink.HEADER_LEN + len(payload), mtype, 0, seq, 0)
    return head + payload + b"\0" * (netlink.align(len(payload)) - len(payload))


def test_walk_yields_every_message_aligned() -> None:
    buf = _msg(24, 7, b"abc") + _msg(2, 8, struct.pack("=i", -1))
    assert list(netlink.walk(buf)) == [(24, 7, 16, 19), (2, 8, 36, 40)]


def test_walk_stops_at_a_broken_header_and_says_why() -> None:
    good = _msg(24, 1, b"")
    walked = list(netlink.walk(good + b"\1\2"))
    assert walked == [(24, 1, 16, 16), "truncated netlink header (2 bytes)"]
    bad = netlink.HEADER.pack(999, 24, 0, 2, 0)
    assert list(netlink.walk(good + bad))[-1] == "bad netlink message length 999 (16 bytes left)"


@given(st.binary(max_size=300))
def test_walk_is_total_and_stays_inside_the_buffer(buf: bytes) -> None:
    for msg in netlink.walk(buf):
        if isinstance(msg, str):
            continue
        _, _, start, end = msg
        assert netlink.HEADER_LEN <= start <= end <= len(buf)
