"""Which initial windows each route through the link gets with terminal plans (pure: the specs
are what pep.kernel.link_routes reads from the kernel)."""

from __future__ import annotations

import ipaddress
from typing import Any

from pep.kernel.terminal_routes import plan

LINK, OTHER_IF = 3, 4
CARRIER = {4: {"initcwnd": 1036, "initrwnd": 259}, 6: {"initcwnd": 1051, "initrwnd": 263}}
T1 = {4: {"initcwnd": 518, "initrwnd": 130}, 6: {"initcwnd": 526, "initrwnd": 132}}
T2 = {4: {"initcwnd": 259, "initrwnd": 65}, 6: {"initcwnd": 263, "initrwnd": 66}}


def route(
    dst: str, oif: int = LINK, table: int = 254, gateway: str | None = "10.81.1.2"
) -> dict[str, Any]:
    net = ipaddress.ip_network(dst)
    return {
        "family": net.version,
        "table": table,
        "dst": None if net.prefixlen == 0 else str(net.network_address),
        "dst_len": net.prefixlen,
        "tos": 0,
        "priority": None,
        "gateway": gateway,
        "oifs": [oif],
        "prefsrc": None,
        "proto": 4,
        "scope": 0,
        "type": 1,
        "flags": 0,
        "pref": None,
        "metrics": {},
        "multipath": None,
        "unsupported": [],
    }


def net(text: str) -> Any:
    return ipaddress.ip_network(text)


def test_routes_within_a_terminal_get_its_plan_the_rest_the_carrier() -> None:
    routes = [
        route("10.81.101.0/24"),
        route("10.81.101.128/25"),
        route("10.81.0.0/16"),
        route("0.0.0.0/0"),
    ]
    changed, added = plan(routes, LINK, routes, CARRIER, [(net("10.81.101.0/24"), T1)])
    assert [m for _, m in changed] == [T1, T1, CARRIER, CARRIER]
    assert added == []  # the network has a route of its own


def test_a_network_only_a_wider_route_carries_gets_its_own_copy_of_it() -> None:
    wide = route("10.81.2.0/24")
    default = route("0.0.0.0/0", oif=OTHER_IF, gateway="192.0.2.1")
    every = [wide, default, route("10.81.2.12/32", oif=OTHER_IF)]
    terminals = [(net("10.81.2.11/32"), T1), (net("10.81.2.12/32"), T2), (net("10.9.0.0/16"), T2)]
    changed, added = plan(every, LINK, [wide], CARRIER, terminals)
    assert changed == [(wide, CARRIER)]
    # .11 goes out through the link by the /24: a /32 of its own, copied from the /24; .12
    # has its own route (elsewhere), and 10.9/16 takes the default route through another
    # interface: neither is touched
    assert added == [({**wide, "dst": "10.81.2.11", "dst_len": 32}, T1)]


def test_copies_are_made_per_table_and_family() -> None:
    v4main, v4other = route("0.0.0.0/0"), route("0.0.0.0/0", table=100)
    v6 = route("::/0", gateway="fd00::1")
    terminals = [(net("10.1.0.0/24"), T1), (net("2001:db8:1::/48"), T2)]
    _, added = plan([v4main, v4other, v6], LINK, [v4main, v4other, v6], CARRIER, terminals)
    assert sorted((a["table"], a["dst"], a["dst_len"]) for a, _ in added) == [
        (100, "10.1.0.0", 24), (254, "10.1.0.0", 24), (254, "2001:db8:1::", 48)
    ]  # fmt: skip
    assert all(m == (T1 if a["family"] == 4 else T2) for a, m in added)


def test_no_terminals_change_nothing_but_the_carrier_metrics() -> None:
    routes = [route("10.0.0.0/8")]
    assert plan(routes, LINK, routes, CARRIER, []) == ([(routes[0], CARRIER)], [])
