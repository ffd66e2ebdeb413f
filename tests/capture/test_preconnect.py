"""Strict mode's parked upstream sockets: opened by the PreConnector, adopted by the session
that claims the flow, closed by the PreConnector whenever the flow table drops one unclaimed."""

from __future__ import annotations

from typing import Any

from pep.capture.flows import FlowTable
from pep.capture.preconnect import PreConnector
from pep.capture.syn import SynInfo
from pep.config import build


def syn(sport: int, src: str = "10.0.0.1") -> SynInfo:
    return SynInfo(4, src, sport, "192.0.2.1", 80, 0, 64, 1460, 7, True, None)


class Upstream:
    """Stands for a connected upstream socket; counts its closes."""

    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def _never(*args: object, **kwargs: object) -> object:
    raise AssertionError("these tests park upstreams by hand")


def table(max_size: int = 10, clock: Clock | None = None) -> FlowTable:
    return FlowTable(max_size, 5.0, clock or Clock(), on_drop=PreConnector(_never).discard)


def park(flows: FlowTable, sport: int) -> Upstream:
    up = Upstream()
    flows.record(syn(sport), up)  # type: ignore[arg-type]
    return up


def test_a_claimed_flow_hands_its_upstream_over_open() -> None:
    flows = table()
    up = park(flows, 1)
    flow = flows.claim(("10.0.0.1", 1))
    assert flow is not None and flow.upstream is up
    flows.clear()
    assert up.closes == 0  # the session owns it now


def test_every_unclaimed_upstream_is_closed_once() -> None:
    clock = Clock()
    flows = table(max_size=2, clock=clock)
    replaced = park(flows, 1)
    evicted = park(flows, 1)  # a new SYN for the same client replaces the entry
    assert (replaced.closes, evicted.closes) == (1, 0)
    expired_at_claim = park(flows, 2)
    expired_at_record = park(flows, 3)  # over max_size: the oldest (port 1) goes
    assert evicted.closes == 1 and flows.evicted == 1
    clock.t += 6  # past the ttl
    assert flows.claim(("10.0.0.1", 2)) is None
    assert expired_at_claim.closes == 1
    park(flows, 4)  # recording purges what expired (port 3)
    assert expired_at_record.closes == 1 and flows.expired == 2
    cleared = park(flows, 5)
    flows.clear()  # the daemon stops
    every = (replaced, evicted, expired_at_claim, expired_at_record, cleared)
    assert [u.closes for u in every] == [1] * 5


def test_a_flow_without_upstream_is_dropped_quietly() -> None:
    clock = Clock()
    flows = table(clock=clock)
    flows.record(syn(1))
    clock.t += 6
    flows.record(syn(2))  # purges port 1, which has nothing to close
    assert flows.expired == 1


async def test_connect_opens_as_the_client_within_the_hold_timeout() -> None:
    calls: list[tuple[Any, ...]] = []
    up = Upstream()

    async def opener(*args: Any, **kwargs: Any) -> Upstream:
        calls.append((*args, kwargs))
        return up

    cfg = build({"interfaces": ["eth1"], "syn_verdict": "after-upstream", "syn_hold_timeout": 0.7})
    s = syn(4242)
    assert await PreConnector(opener).connect(cfg, s) is up  # type: ignore[arg-type]
    assert calls == [(cfg, ("192.0.2.1", 80), ("10.0.0.1", 4242), s, {"timeout": 0.7})]
