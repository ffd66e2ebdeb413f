"""The hub's shares (pep.link.terminalshare): weighted max-min among terminals, max-min within
each; the table the sharer keeps with plans; what pep status reads per terminal (pep.link.plans).
Property tests hold the issue's rules: no terminal above its plan, never above the carrier,
nothing left unused while a terminal wants more."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.config.link import Link
from pep.config.terminals import OTHER, Terminal
from pep.link.fairshare import HEADROOM, TOLERANCE, ShareTable
from pep.link.plans import Plans
from pep.link.tcpinfo import TcpInfo
from pep.link.terminalshare import PlanShareTable, hierarchical_shares, weighted_fill


def test_weighted_fill_gives_a_capped_ones_rest_to_the_others() -> None:
    assert weighted_fill(20, [10, 10, 10, 10], [10, 10, 10, 10]) == [5, 5, 5, 5]
    assert weighted_fill(20, [10, 5], [3, 100]) == [3, 17]
    assert weighted_fill(30, [2, 1], [100, 100]) == [20, 10]  # weighted by plan
    assert weighted_fill(30, [10, 10], [5, 5]) == [5, 5]  # everyone at its limit
    assert weighted_fill(10, [], []) == []


def test_neighbours_each_terminal_gets_its_plan_and_its_flows_share_it() -> None:
    """The issue's case: six flows to t1, one to t2, plans of half the carrier each."""
    caps = hierarchical_shares(20, ["t1"] * 6 + ["t2"], [None] * 7, {"t1": 10, "t2": 10})
    assert caps[:6] == pytest.approx([10 / 6] * 6) and caps[6] == pytest.approx(10)


def test_oversubscribed_terminals_share_the_carrier_by_weight() -> None:
    plans = {"t1": 10.0, "t2": 10.0, "t3": 10.0, "t4": 5.0}
    names = ["t1"] * 3 + ["t2"] * 3 + ["t3"] * 3 + ["t4"]
    caps = hierarchical_shares(20, names, [None] * 10, plans)
    per = {t: sum(c for c, n in zip(caps, names, strict=True) if n == t) for t in plans}
    assert per == pytest.approx({"t1": 20 * 10 / 35, "t2": 20 * 10 / 35, "t3": 20 * 10 / 35,
                                 "t4": 20 * 5 / 35})  # fmt: skip


def test_a_light_terminal_leaves_the_rest_to_the_others_up_to_their_plans() -> None:
    caps = hierarchical_shares(
        20, ["t1", "t2", "t3"], [1.0, None, None], {t: 8 for t in ("t1", "t2", "t3")}
    )
    # t1 wants 1; t2 and t3 are capped at their plans (8 each); the 3 left over go to t1's
    # flow as headroom (at most its plan): the caps add up to the carrier
    assert caps == pytest.approx([4.0, 8.0, 8.0])


def test_flows_of_no_terminal_share_what_the_terminals_leave() -> None:
    caps = hierarchical_shares(20, ["t1", "t1", None, None], [None, None, None, 2.0], {"t1": 10})
    assert caps[:2] == pytest.approx([5, 5])
    assert caps[2:] == pytest.approx([8, 2])
    # terminals first: with every terminal at its plan, others keep the floor
    caps = hierarchical_shares(
        20, ["t1", "t2", None], [None, None, None], {"t1": 10, "t2": 10}, floor=0.5
    )
    assert caps == pytest.approx([10, 10, 0.5])


def test_a_terminal_missing_from_the_plans_counts_as_none() -> None:
    """After a reload dropped it, before its legs were looked up again."""
    assert hierarchical_shares(10, ["gone", "t1"], [None, None], {"t1": 4}) == pytest.approx([6, 4])


flows = st.lists(
    st.tuples(
        st.sampled_from(["t1", "t2", "t3", "t4", None]),
        st.one_of(st.none(), st.floats(0, 30, allow_nan=False)),
    ),
    min_size=1,
    max_size=25,
)
plans = st.fixed_dictionaries({t: st.floats(0.5, 30) for t in ("t1", "t2", "t3", "t4")})


@given(st.floats(1, 100), flows, plans)
def test_shares_hold_the_plans_and_the_carrier_and_leave_nothing_a_terminal_wants(
    capacity: float, fl: list[tuple[str | None, float | None]], pl: dict[str, float]
) -> None:
    names = [n for n, _ in fl]
    demands = [d for _, d in fl]
    caps = hierarchical_shares(capacity, names, demands, pl)
    assert all(c >= 0 for c in caps)
    assert sum(caps) <= capacity * (1 + 1e-9) + 1e-9  # never above the carrier
    per: dict[str, float] = {}
    for n, c in zip(names, caps, strict=True):
        if n is not None:
            per[n] = per.get(n, 0.0) + c
    for t, total in per.items():
        assert total <= pl[t] * (1 + 1e-9) + 1e-9  # never above a plan
    unused = capacity - sum(caps)
    if unused > 1e-6 * capacity:  # something is left: no terminal wants more than it has
        for t, total in per.items():
            mine = [d for n, d in fl if n == t]
            want = pl[t] if None in mine else min(pl[t], sum(d for d in mine if d is not None))
            assert total >= want - 1e-6 * capacity, (t, total, want)
        assert not any(n is None for n in names)  # flows of no terminal would take it
    # within a terminal, max-min: a flow gets less than another only if it wants less
    for t in per:
        mine = [(c, d) for (n, d), c in zip(fl, caps, strict=True) if n == t]
        top = max(c for c, _ in mine)
        for c, d in mine:
            assert c >= top - 1e-6 * capacity or (d is not None and c >= d - 1e-9)


def test_plan_share_table_wakes_a_terminal_flow_at_most_at_its_plan() -> None:
    table = PlanShareTable(20.0, 0.0, {"t1": 10.0, "t2": 10.0})
    assert table.add(1, "t1") == 10.0  # an equal share of the carrier, but at most the plan
    assert table.add(2, "t2") == 10.0
    assert table.add(3, None) == 20.0 / 1
    for fid in (1, 2):
        table.wake(fid)
    assert table.reshare() == {}  # each has its plan already
    table.wake(3)
    assert table.flows[3].cap == pytest.approx(0.0)  # every terminal at its plan: none left
    table.sample(1, 1000, 1000, 0, 1.0)
    table.sample(1, 1000, 1000, 0, 1.0)  # t1 went idle: its share goes to the others
    assert table.reshare() == {3: pytest.approx(10.0)}
    table.replan({"t1": 10.0, "t2": 5.0})
    assert table.dirty and table.reshare() == {2: pytest.approx(5.0), 3: pytest.approx(15.0)}


def test_plan_share_table_without_plans_is_the_flat_table() -> None:
    tables = (PlanShareTable(1200.0, 0.5), ShareTable(1200.0, 0.5))
    for table in tables:
        for fid in (1, 2, 3):
            table.add(fid, "t1") if isinstance(table, PlanShareTable) else table.add(fid)
            table.wake(fid)
        table.reshare()
        table.sample(1, 100, 100, 0, 1.0)
        table.wake(1)
        table.sample(1, 200, 250, 0, 1.0)  # measured 100 B/s, fed more: active, not backlogged
        table.reshare()
    a, b = ([t.flows[f].cap for f in (1, 2, 3)] for t in tables)
    assert a == b and a == pytest.approx([100 * HEADROOM, 525, 525])


def _info(sent: int, retrans: int, dsack: int) -> TcpInfo:
    fields = dict.fromkeys(TcpInfo._fields, 0)
    fields.update(bytes_sent=sent, total_retrans=retrans, dsack_dups=dsack)
    return TcpInfo(**fields)


class _Leg:
    def __init__(
        self, terminal: str | None, active: bool, share: float, info: TcpInfo, rate: float = 0.0
    ) -> None:
        self.terminal, self.active, self.share, self.info = terminal, active, share, info
        self.rate = rate


def test_plans_count_per_terminal_for_status() -> None:
    t1 = Terminal("t1", (ipaddress.ip_network("10.1.0.0/24"),), 10_000_000, 2_000_000)
    link = Link("sat0", 0.6, 20_000_000, 5_000_000, None, terminals=(t1,))
    plans = Plans.of(link, 1500)
    assert plans.caps["t1"] == pytest.approx(link.pacing_capacity(1500) / 2)
    assert plans.terminal("10.1.0.9") == "t1" and plans.terminal("10.2.0.1") is None
    plans.joined("t1")
    plans.joined(None)
    plans.closed("t1", _info(3000, 4, 1))
    rows = plans.snapshot(
        [_Leg("t1", True, 1000.0, _info(500, 2, 2), 10_000.0),
         _Leg("t1", False, 7.0, _info(1, 0, 0), 99.0),  # idle: its last rate does not count
         _Leg(None, True, 10.0, _info(9, 0, 0))]
    )  # fmt: skip
    assert [r["name"] for r in rows] == ["t1", OTHER]
    assert rows[0] == {
        "name": "t1",
        "egress_bps": 10_000_000,
        "ingress_bps": 2_000_000,
        "plan_capacity_bps": round(plans.caps["t1"] * 8),
        "legs": 2,
        "legs_active": 1,
        "share_bps": 8000,
        "send_rate_bps": 80_000,
        "bytes_sent": 3501,
        "retransmits": 6,
        "lost": 3,
    }
    assert rows[1]["egress_bps"] is None and rows[1]["legs"] == 1
    assert plans.snapshot([])[0]["send_rate_bps"] == 0  # no legs: not sending
    again = Plans.of(link, 1500, plans)  # a reload keeps the counters
    assert again.snapshot([])[0]["retransmits"] == 4


@given(
    st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3", None]), st.booleans()), max_size=12),
    st.sampled_from(["t1", "t2", "t3"]),
    plans,
)
def test_a_waking_flows_share_is_the_reshares_or_below_it(
    others: list[tuple[str | None, bool]], terminal: str, pl: dict[str, float]
) -> None:
    """The cheap share a flow wakes with (one pass over the active flows) is exact when every
    active flow wants more, and never above what the reshare then gives it."""
    table = PlanShareTable(40.0, 0.0, pl)
    for fid, (name, _) in enumerate(others):
        table.add(fid, name)
        table.wake(fid)
    for fid, (_, backlogged) in enumerate(others):
        if not backlogged:  # sends 1 B/s and keeps being fed: active, wants little
            table.sample(fid, 1, 2, 0, 1.0)
    table.reshare()
    new = len(others)
    table.add(new, terminal)
    table.wake(new)
    woke = table.flows[new].cap
    table.reshare()
    # within the table's TOLERANCE: a cap that close to the one it had is not re-set
    assert woke <= table.flows[new].cap * (1 + TOLERANCE) + 1e-9
    if all(b for _, b in others):
        assert woke == pytest.approx(table.flows[new].cap, rel=TOLERANCE)


def test_with_plans_a_reshare_computes_only_when_a_demand_moved() -> None:
    table = PlanShareTable(20.0, 0.0, {"t1": 10.0, "t2": 10.0})
    for fid, name in ((1, "t1"), (2, "t1"), (3, "t2")):
        table.add(fid, name)
        table.wake(fid)
    table.reshare()
    calls: list[int] = []
    shares = table._shares
    table._shares = lambda: calls.append(1) or shares()  # type: ignore[method-assign]
    for fid in (1, 2, 3):
        table.sample(fid, 100, 200, 50, 0.05)  # all still backlogged
    assert table.reshare() == {} and calls == []  # nothing moved: nothing computed
    table.capacity = 16.0  # a worker's part of the link changed (pep.link.pacer._rescale)
    assert table.reshare() == pytest.approx({1: 4.0, 2: 4.0, 3: 8.0}) and len(calls) == 1
    table.sample(1, 150, 250, 0, 0.05)  # sent 50 and keeps being fed: below its share now
    table.reshare()
    assert len(calls) == 2
    table.sample(1, 200, 300, 0, 0.05)  # its measured rate moves every tick
    table.reshare()
    assert len(calls) == 3
