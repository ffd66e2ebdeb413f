"""Terminal plans (pep.config.terminals): the inline tables, the plans file and its line-numbered
errors, the checks between terminals and against the carrier, and the lookup by address."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.config import ConfigError, build
from pep.config.link import Link
from pep.config.terminals import OTHER, Terminal, TerminalTable, parse_file


def link_settings(**more: object) -> dict[str, object]:
    return {
        "interfaces": ["sat0"],
        "link": {
            "interface": "sat0",
            "rtt": "600ms",
            "egress_rate": "20mbit",
            "ingress_rate": "5mbit",
            **more,
        },
    }


def plan(name: str, *networks: str, egress: str = "10mbit", ingress: str = "2mbit") -> dict:
    return {
        "name": name,
        "networks": list(networks),
        "egress_rate": egress,
        "ingress_rate": ingress,
    }


def test_inline_terminals_and_a_file_together(tmp_path: Path) -> None:
    f = tmp_path / "terminals.txt"
    f.write_text(
        "# NAME  EGRESS  INGRESS  NETWORKS\n"
        "\n"
        "t2   5mbit  1mbit   10.81.102.0/24 2001:db8:2::/48   # a comment\n"
        "t3   10mbit 2.5mbit 10.81.103.0/24,10.81.2.13/32\n"
    )
    cfg = build(link_settings(terminals=[plan("t1", "10.81.101.0/24")], terminals_file=str(f)))
    link = cfg.link
    assert link is not None
    assert link.terminals == (
        Terminal("t1", (ipaddress.ip_network("10.81.101.0/24"),), 10_000_000, 2_000_000),
    )
    assert link.terminals_file is not None and link.terminals_file.lines == (3, 4)
    table = link.plans()
    assert [t.name for t in table] == ["t1", "t2", "t3"]
    assert table.by_name["t3"].ingress_rate == 2_500_000
    assert table.lookup("10.81.2.13").name == "t3"  # type: ignore[union-attr]
    assert table.lookup("2001:db8:2::7").name == "t2"  # type: ignore[union-attr]
    assert table.lookup("10.81.104.1") is None
    # the status document shows the file by its path, not its thousands of lines
    assert repr(link.terminals_file) == f"{f} (2 terminals)"


def test_a_plan_derives_its_own_numbers_from_the_carriers_rtt() -> None:
    link = Link("sat0", 0.6, 1_000_000_000, 100_000_000, None)
    t = Terminal("t1", (ipaddress.ip_network("10.0.0.0/24"),), 10_000_000, 2_000_000)
    mine = link.for_terminal(t)
    assert mine.bdp("egress") == 750_000 and link.bdp("egress") == 75_000_000
    assert mine.route_metrics(1500) == {"initcwnd": 518, "initrwnd": 104}
    assert mine.sndbuf == 1_500_000 and mine.rcvbuf == 300_000
    assert mine.pacing_capacity(1500) == pytest.approx(link.pacing_capacity(1500) / 100)


@pytest.mark.parametrize(
    ("more", "key", "fragment"),
    [
        ({"terminals": [plan("t1", "10.0.0.0/24", egress="0mbit")]},
         "link.terminals[0].egress_rate", "is 0: a plan must be at least 8 kbit/s"),
        ({"terminals": [plan("t1", "10.0.0.0/24", ingress="fast")]},
         "link.terminals[0].ingress_rate", "with a unit"),
        ({"terminals": [plan("t 1", "10.0.0.0/24")]}, "link.terminals[0].name", "no spaces"),
        ({"terminals": [plan("t1", "10.0.0.300/24")]}, "link.terminals[0].networks",
         "is not an IP network"),
        ({"terminals": [{"name": "t1", "networks": ["10.0.0.0/8"], "egress_rate": "1mbit"}]},
         "link.terminals[0].ingress_rate", "is required"),
        ({"terminals": {"name": "t1"}}, "link.terminals", "array of tables"),
        ({"terminals": [plan("t1", "10.0.0.0/24"), plan("t1", "10.1.0.0/24")]},
         "link.terminals[1]", "terminal t1 again (link.terminals[0])"),
        ({"terminals": [plan("t1", "10.0.0.0/16"), plan("t2", "10.0.7.0/24")]},
         "link.terminals[1]", "network 10.0.7.0/24 overlaps terminal t1's 10.0.0.0/16"),
        ({"terminals": [plan("t1", "10.0.0.0/24", "10.0.0.128/25")]}, "link.terminals[0]",
         "overlaps its own 10.0.0.0/24"),
        ({"terminals": [plan("t1", "10.0.0.0/24", egress="30mbit")]}, "link.terminals[0]",
         "its egress_rate 30 Mbit/s is above the link's egress_rate 20 Mbit/s"),
        ({"terminals": [plan("t1", "10.0.0.0/24", ingress="6mbit")]}, "link.terminals[0]",
         "its ingress_rate 6 Mbit/s is above the link's ingress_rate 5 Mbit/s"),
        ({"terminals_file": "terminals.txt"}, "link.terminals_file", "absolute path"),
        ({"terminals_file": "/nonexistent/terminals.txt"}, "link.terminals_file",
         "file does not exist"),
    ],
)  # fmt: skip
def test_bad_terminals_name_the_key_and_the_problem(
    more: dict[str, object], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as e:
        build(link_settings(**more))
    assert e.value.key == key, str(e.value)
    assert fragment in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("t1 10mbit 2mbit\n", "line 1: expected NAME EGRESS INGRESS NETWORK [NETWORK ...], got 3"),
        ("# ok\nt1 10mbit 2mbit 10.0.0.0/24\nt2 10 2mbit 10.1.0.0/24\n",
         "line 3: egress '10' must be a number with a unit"),
        ("t1 10mbit 0kbit 10.0.0.0/24\n", "line 1: ingress '0kbit' is 0"),
        ("t1 10mbit 2mbit 10.0.0.0/33\n", "line 1: network '10.0.0.0/33' is not an IP network"),
        ("t/1 10mbit 2mbit 10.0.0.0/24\n", "line 1: name 't/1' must be a name"),
        ("t1 10mbit 2mbit 10.0.0.0/24\n\nt1 5mbit 1mbit 10.1.0.0/24\n",
         "line 3: terminal t1 again (line 1)"),
        ("t1 10mbit 2mbit 10.0.0.0/24\nt2 5mbit 1mbit 10.0.0.5/32\n",
         "line 2: terminal t2: network 10.0.0.5/32 overlaps terminal t1's 10.0.0.0/24 (line 1)"),
        ("t1 25mbit 2mbit 10.0.0.0/24\n", "line 1: terminal t1: its egress_rate 25 Mbit/s"),
    ],
)  # fmt: skip
def test_a_bad_plans_file_names_its_line(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "terminals.txt"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        build(link_settings(terminals_file=str(f)))
    assert e.value.key == "link.terminals_file" and e.value.value == str(f)
    assert fragment in str(e.value), str(e.value)


def test_an_inline_terminal_and_one_in_the_file_may_not_overlap(tmp_path: Path) -> None:
    f = tmp_path / "terminals.txt"
    f.write_text("t2 10mbit 2mbit 10.0.0.0/16\n")
    with pytest.raises(
        ConfigError,
        match=r"terminal t1: network 10.0.3.0/24 overlaps terminal t2's 10.0.0.0/16 \(line 1\)",
    ):
        build(link_settings(terminals=[plan("t1", "10.0.3.0/24")], terminals_file=str(f)))


def test_a_plans_file_that_is_not_text(tmp_path: Path) -> None:
    f = tmp_path / "terminals.txt"
    f.write_bytes(b"t1 10mbit 2mbit \xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        build(link_settings(terminals_file=str(f)))


def test_a_changed_file_is_a_changed_link(tmp_path: Path) -> None:
    """What makes SIGHUP apply a new plans file (pep.ops.reload compares the [link] tables)."""
    f = tmp_path / "terminals.txt"
    f.write_text("t1 10mbit 2mbit 10.0.0.0/24\n")
    a = build(link_settings(terminals_file=str(f)))
    assert build(link_settings(terminals_file=str(f))) == a
    f.write_text("t1 5mbit 2mbit 10.0.0.0/24\n")
    assert build(link_settings(terminals_file=str(f))) != a


def test_parse_file_returns_each_terminal_with_its_line() -> None:
    terminals, lines = parse_file("\n# fleet\nt1 1mbit 1mbit 10.0.0.0/30 ::ffff:0:0/127\n")
    assert lines == [3] and terminals[0].networks[1].version == 6


def test_lookup_takes_the_longest_prefix_and_ipv4_mapped_addresses() -> None:
    """The config refuses overlaps, but the table itself does longest-prefix match."""
    wide = Terminal("wide", (ipaddress.ip_network("10.0.0.0/8"),), 1, 1)
    narrow = Terminal("narrow", (ipaddress.ip_network("10.1.2.0/24"),), 1, 1)
    table = TerminalTable([wide, narrow])
    assert table.lookup("10.1.2.3") is narrow
    assert table.lookup("10.1.3.3") is wide
    assert table.lookup("::ffff:10.1.2.3") is narrow
    assert table.lookup("11.0.0.1") is None
    assert table.lookup("not an address") is None and table.lookup(None) is None
    assert TerminalTable().lookup("10.1.2.3") is None
    assert OTHER == "(other)"  # not a valid name: never a terminal's


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=40), st.data())
def test_lookup_agrees_with_a_linear_scan(nets: list[tuple[int, int]], data: st.DataObject) -> None:
    terminals = [
        Terminal(f"t{i}", (ipaddress.ip_network((addr, plen), strict=False),), 1, 1)
        for i, (addr, plen) in enumerate(nets)
    ]
    table = TerminalTable(terminals)
    for _ in range(20):
        ip = ipaddress.ip_address(data.draw(st.integers(0, 2**32 - 1)))
        holders = [t for t in terminals if ip in t.networks[0]]
        best = max((t.networks[0].prefixlen for t in holders), default=None)
        found = table.lookup(str(ip))
        if best is None:
            assert found is None
        else:
            assert found is not None and found.networks[0].prefixlen == best
            assert ip in found.networks[0]


def test_the_shipped_sample_plans_file_parses() -> None:
    sample = Path(__file__).parents[2] / "deploy" / "terminals.txt"
    terminals, _ = parse_file(sample.read_text())
    assert [t.name for t in terminals] == ["t1", "t2", "t3"]
