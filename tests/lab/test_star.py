"""The star lab's plan (pep.lab.star, pure): plans from the profile or --plans, the modem's
classes, the hub's plans file and configs (accepted by pep's own config), the bench's rate
arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from pep.config import load
from pep.lab.plan import LabError, LabSpec, pep_config_text
from pep.lab.profiles import PROFILES, ParseError
from pep.lab.star import Plan, Star, default_plans, parse_plans
from pep.lab.star_bench import payload, rate_between, settled_after

GEO = PROFILES["geo"]


def test_default_plans_are_half_the_carrier_each_way() -> None:
    assert default_plans(GEO, 3) == (Plan(10_000_000, 2_500_000),) * 3


@pytest.mark.parametrize(
    ("text", "n", "plans"),
    [
        (
            "10mbit,10mbit,5mbit",
            3,
            (Plan(10_000_000, 2_500_000),) * 2 + (Plan(5_000_000, 1_250_000),),
        ),
        ("8mbit/1mbit", 2, (Plan(8_000_000, 1_000_000),) * 2),
        ("10", 2, (Plan(10_000_000, 2_500_000),) * 2),  # a bare number is Mbit/s, as --down
    ],
)
def test_parse_plans(text: str, n: int, plans: tuple[Plan, ...]) -> None:
    assert parse_plans(text, n, GEO) == plans


@pytest.mark.parametrize(
    ("text", "n", "words"),
    [
        ("10mbit,5mbit", 3, r"one per terminal \(3\)"),
        ("30mbit", 2, "above the carrier"),
        ("10mbit/6mbit", 2, "above the carrier"),
        ("0", 2, "above 0"),
        ("fast", 2, "expected Mbit/s"),
    ],
)
def test_bad_plans_say_why(text: str, n: int, words: str) -> None:
    with pytest.raises(ParseError, match=words):
        parse_plans(text, n, GEO)


def test_terminals_from_2_to_32() -> None:
    Star(GEO, default_plans(GEO, 2))
    with pytest.raises(ParseError, match="from 2 to 32"):
        Star(GEO, default_plans(GEO, 1))
    with pytest.raises(LabError, match="topology"):
        LabSpec(GEO, "starry")


def test_the_modem_shares_the_carrier_by_plan_with_a_bdp_per_terminal() -> None:
    star = Star(
        GEO, (Plan(10_000_000, 2_500_000), Plan(10_000_000, 2_500_000), Plan(5_000_000, 1_250_000))
    )
    down = star.classes("down")
    assert [c.ceil * 8 for c in down] == [10_000_000, 10_000_000, 5_000_000]  # the plans
    assert [c.rate * 8 for c in down] == [8_000_000, 8_000_000, 4_000_000]  # 20 by 10:10:5
    assert down[0].limit == 750_000 + 4000 and down[2].limit == 375_000 + 4000  # one BDP
    assert down[1].networks == ("10.81.102.0/24", "10.81.2.12/32")
    assert star.carrier("up") == 625_000
    assert [c.rate * 8 for c in star.classes("up")] == [2_000_000, 2_000_000, 1_000_000]


def test_nodes_routes_and_the_hubs_per_terminal_routes() -> None:
    star = Star(GEO, default_plans(GEO, 2), terminal_pep=False)
    assert star.nodes() == ["server", "hub", "link", "t1", "t2", "c1", "c2"]
    assert star.pep_nodes() == ["hub"]
    assert star.routes()["hub"] == [
        "10.81.2.0/24 via 10.81.1.2", "10.81.101.0/24 via 10.81.1.2", "10.81.102.0/24 via 10.81.1.2"
    ]  # fmt: skip
    ports = [b.name for a, b in star.links() if b.node == "link" and not b.addr]
    assert ports == ["t1", "t2"]


def test_the_hub_and_terminal_configs_are_pep_configs(tmp_path: Path) -> None:
    star = Star(GEO, (Plan(10_000_000, 2_500_000), Plan(5_000_000, 1_250_000)))
    plans = tmp_path / "terminals.txt"
    plans.write_text(star.terminals_file())
    key = tmp_path / "peer.key"
    key.write_text("00" * 32 + "\n")
    key.chmod(0o600)
    hub = tmp_path / "hub.toml"
    link = star.link_table("hub", str(plans))
    hub.write_text(pep_config_text("sat0", link, None, star.peer_table("hub", str(key))))
    cfg = load(hub, {})
    assert cfg.link is not None and cfg.link.egress_rate == 20_000_000
    table = cfg.link.plans()
    assert table.by_name["t2"].egress_rate == 5_000_000
    assert table.lookup("10.81.2.12").name == "t2"  # type: ignore[union-attr]
    assert cfg.peer is not None and cfg.peer.listen == "10.81.1.1:5001"
    t2 = tmp_path / "t2.toml"
    t2.write_text(
        pep_config_text("lan0", star.link_table("t2", ""), None, star.peer_table("t2", str(key)))
    )
    cfg = load(t2, {})
    assert cfg.link is not None and (cfg.link.egress_rate, cfg.link.ingress_rate) == (
        1_250_000,
        5_000_000,
    )
    assert cfg.link.terminals_file is None and cfg.peer is not None and cfg.peer.connect


def test_rates_from_progress_samples() -> None:
    # 1 MB/s for 4 s, then 0.5 MB/s for 4 s, sampled every 5 ms
    samples = [
        (t / 200, round(min(t / 200, 4) * 1e6 + max(0, t / 200 - 4) * 5e5)) for t in range(1601)
    ]
    assert rate_between(samples, 1, 3) == pytest.approx(1e6, rel=0.01)
    assert rate_between(samples, 5, 8) == pytest.approx(5e5, rel=0.01)
    assert settled_after(samples, 4.0, 8.0, 5e5) == pytest.approx(0.0, abs=0.06)
    # from 3 s: the windows settle once they hold (almost) nothing of the faster rate
    assert settled_after(samples, 3.0, 8.0, 5e5) == pytest.approx(1.0, abs=0.06)
    assert settled_after(samples, 3.0, 8.0, 2e5) is None
    assert payload(20_000_000) == pytest.approx(20_000_000 * 1448 / 1514)
