"""Flow table: expiry, replacement, bounds (pure, no root)."""

from __future__ import annotations

from pep.capture.flows import FlowTable
from pep.capture.syn import SynInfo


def syn(sport: int, dst: str = "192.0.2.1", dport: int = 80, src: str = "10.0.0.1") -> SynInfo:
    return SynInfo(4, src, sport, dst, dport, 0, 64, 1460, 7, True, None)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_claim_returns_recorded_flow_once() -> None:
    t = FlowTable(10, 5.0)
    t.record(syn(1000))
    flow = t.claim(("10.0.0.1", 1000))
    assert flow is not None and flow.original_dst == ("192.0.2.1", 80)
    assert t.claim(("10.0.0.1", 1000)) is None
    assert len(t) == 0


def test_new_syn_on_same_key_replaces_old_entry() -> None:
    clock = Clock()
    t = FlowTable(10, 5.0, clock)
    t.record(syn(1000, dst="192.0.2.1"))
    clock.t += 4
    t.record(syn(1000, dst="198.51.100.7", dport=443))
    assert len(t) == 1
    clock.t += 4  # 8 s after the first SYN, 4 s after the second: the new entry is alive
    flow = t.claim(("10.0.0.1", 1000))
    assert flow is not None and flow.original_dst == ("198.51.100.7", 443)


def test_entries_expire_after_ttl() -> None:
    clock = Clock()
    t = FlowTable(10, 5.0, clock)
    t.record(syn(1))
    clock.t += 5.5
    assert t.claim(("10.0.0.1", 1)) is None
    assert t.expired == 1
    t.record(syn(2))
    clock.t += 3
    t.record(syn(3))
    clock.t += 3  # syn 2 is 6 s old: purged by the next record
    t.record(syn(4))
    assert len(t) == 2 and t.expired == 2


def test_table_is_bounded_and_evicts_oldest() -> None:
    t = FlowTable(100, 60.0)
    for port in range(1, 10_001):
        t.record(syn(port))
    assert len(t) == 100
    assert t.evicted == 9_900
    assert t.claim(("10.0.0.1", 1)) is None
    assert t.claim(("10.0.0.1", 10_000)) is not None


def test_keys_distinguish_clients() -> None:
    t = FlowTable(10, 5.0)
    t.record(syn(5, src="10.0.0.1", dst="192.0.2.1"))
    t.record(syn(5, src="10.0.0.2", dst="192.0.2.2"))
    a, b = t.claim(("10.0.0.1", 5)), t.claim(("10.0.0.2", 5))
    assert a is not None and a.original_dst[0] == "192.0.2.1"
    assert b is not None and b.original_dst[0] == "192.0.2.2"
