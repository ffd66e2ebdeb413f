"""The pure parts of the reliability fixes: the descriptor budget and its use by the SYN
reader's verdicts (no root, no namespaces)."""

from __future__ import annotations

import os
import resource
import struct

import pytest

from pep.capture import nfq_codec as nfq
from pep.capture.fdbudget import FdBudget, nofile_limit, open_fds
from pep.capture.flows import FlowTable
from pep.capture.syn_queue import Decider, SynCounters
from pep.config import Config
from tests.helpers.packets import ipv4_packet, nla, packet_msg, tcp_segment


class Fake:
    """The budget's clock, descriptor count and limit, as the test sets them."""

    def __init__(self, limit: int | None, used: int) -> None:
        self.limit, self.used, self.now, self.reads = limit, used, 0.0, 0

    def count(self) -> int:
        self.reads += 1
        return self.used


@pytest.fixture
def fake() -> Fake:
    return Fake(100, 10)


def budget(fake: Fake) -> FdBudget:
    return FdBudget(
        interval=0.05, clock=lambda: fake.now, count=fake.count, limit=lambda: fake.limit
    )


def test_far_from_the_limit_no_descriptor_is_counted(fake: Fake) -> None:
    fake.limit = 100_000
    b = budget(fake)
    reads = fake.reads
    assert all(b.room() for _ in range(1000))
    assert fake.reads == reads  # /proc/self/fd is listed only near the limit


def test_room_for_as_many_connections_as_fit_then_none(fake: Fake) -> None:
    b = budget(fake)  # 10 used, limit 100: (100 - 10 - RESERVE) // PER_CONNECTION fit
    fit = (100 - 10 - FdBudget.RESERVE) // FdBudget.PER_CONNECTION
    assert [b.room() for _ in range(fit + 3)] == [True] * fit + [False] * 3


def test_a_new_reading_after_the_interval_frees_the_budget(fake: Fake) -> None:
    b = budget(fake)
    while b.room():
        pass
    fake.used = 12  # those SYNs never became connections (a flood): few descriptors used
    assert not b.room()  # still within the interval: the old reading stands
    fake.now += 0.06
    assert b.room()


def test_a_lowered_limit_is_noticed_within_a_second(fake: Fake) -> None:
    fake.limit = 100_000
    b = budget(fake)
    assert b.room()
    fake.limit = 20
    fake.now += 0.5
    assert b.room()  # not yet re-read
    fake.now += 0.6
    assert not b.room()


def test_unlimited_descriptors(fake: Fake) -> None:
    fake.limit = None
    assert all(budget(fake).room() for _ in range(100))


def test_the_real_count_and_limit_are_this_process_s() -> None:
    before = open_fds()
    r, w = os.pipe()
    try:
        assert open_fds() == before + 2
    finally:
        os.close(r)
        os.close(w)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert nofile_limit() == (None if soft == resource.RLIM_INFINITY else soft)


def test_no_room_means_accepted_unsplit_and_counted() -> None:
    counters = SynCounters()
    d = Decider(Config(interfaces=("x",)), FlowTable(64, 30), counters, room=lambda: False)
    seg = tcp_segment("10.0.0.1", "10.0.0.2", 1234, 80)
    payload = ipv4_packet("10.0.0.1", "10.0.0.2", seg)
    msg = nfq.Packet(0, 7, 0x0800, 0, 0, None, None, payload, None)
    verdicts, holds = d.decide([msg])
    assert not holds
    assert [(v.packet_id, v.verdict, v.mark) for v in verdicts] == [(7, nfq.NF_ACCEPT, None)]
    assert (counters.fd_bypassed, counters.split) == (1, 0)


def test_a_second_short_packet_hdr_keeps_the_first_id_for_the_verdict() -> None:
    """Found by tests/reliability/test_badinput.py: a later PACKET_HDR, broken or not,
    must neither make the packet unverdictable nor re-name it (a packet without a verdict
    hangs its connection; a verdict for another id would release the wrong packet)."""
    for second in (b"", struct.pack(">IHB", 7, 0x800, 1)):
        msg = packet_msg(queue=0, packet_id=42, payload=None, extra=nla(1, second))
        (m,) = nfq.parse_messages(msg)
        assert isinstance(m, nfq.Malformed) and m.packet_id == 42
