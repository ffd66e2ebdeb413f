"""pep/kernel/tproxy_routes.py without a kernel: pyroute2's errors become RoutingError, removal goes
on.

A fake IPRoute stands in for pyroute2's: the real path is checked in the namespace tests
(tests/split/test_modes.py installs, shows and removes TPROXY mode's rules and routes).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pep.kernel import tproxy_routes

RULE = {"FRA_PROTOCOL": 94, "FRA_PRIORITY": 32765, "FRA_TABLE": 1513}
RULE |= {"FRA_FWMARK": 0x10000, "FRA_FWMASK": 0x10000}
ROUTE = {"proto": 94, "dst_len": 0, "type": 2, "scope": 0, "RTA_TABLE": 1513, "RTA_OIF": 1}


class FakeIPRoute:
    """pep's rule and route in both families; ``refuse`` maps a call to the errno it fails with."""

    def __init__(self, refuse: dict[str, int]) -> None:
        self.refuse = refuse
        self.deleted: list[tuple[str, int]] = []

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _maybe_refuse(self, call: str) -> None:
        if call in self.refuse:
            raise NetlinkError(self.refuse[call])

    def get_rules(self, family: int) -> list[dict[str, Any]]:
        self._maybe_refuse(f"get_rules {family}")
        return [RULE, {**RULE, "FRA_PROTOCOL": 2}]  # the second one is not pep's

    def get_routes(self, family: int, table: None, proto: int) -> list[dict[str, Any]]:
        self._maybe_refuse(f"get_routes {family}")
        return [ROUTE]

    def rule(self, command: str, family: int, **kw: object) -> None:
        self._maybe_refuse(f"rule {command} {family}")
        self.deleted.append(("rule", family))

    def route(self, command: str, family: int, **kw: object) -> None:
        self._maybe_refuse(f"route {command} {family}")
        self.deleted.append(("route", family))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeIPRoute:
    ipr = FakeIPRoute({})
    monkeypatch.setattr(tproxy_routes, "IPRoute", lambda: ipr)
    return ipr


def test_show_and_remove_find_only_peps_own(fake: FakeIPRoute) -> None:
    assert tproxy_routes.show() == [
        "ip -4 rule: 32765: fwmark 0x10000/0x10000 lookup 1513 proto 94",
        "ip -4 route: local default dev lo table 1513 proto 94",
        "ip -6 rule: 32765: fwmark 0x10000/0x10000 lookup 1513 proto 94",
        "ip -6 route: local default dev lo table 1513 proto 94",
    ]
    assert tproxy_routes.remove() == 4


def test_show_raises_routing_error_not_netlink_error(fake: FakeIPRoute) -> None:
    fake.refuse[f"get_routes {socket.AF_INET6}"] = errno.EPERM
    with pytest.raises(tproxy_routes.RoutingError, match="Operation not permitted") as exc:
        tproxy_routes.show()
    assert isinstance(exc.value.__cause__, NetlinkError)


def test_remove_goes_on_past_a_refusal_and_names_every_one(fake: FakeIPRoute) -> None:
    fake.refuse[f"rule del {socket.AF_INET}"] = errno.EPERM
    fake.refuse[f"get_rules {socket.AF_INET6}"] = errno.EAFNOSUPPORT
    with pytest.raises(tproxy_routes.RoutingError) as exc:
        tproxy_routes.remove()
    message = str(exc.value)
    assert "`ip -4 rule del fwmark 0x10000/0x10000 lookup 1513 proto 94`: Operation not" in message
    assert "listing pep's IPv6 rules and routes: Address family not supported" in message
    assert fake.deleted == [("route", socket.AF_INET)]  # the IPv4 route went all the same


def test_remove_when_netlink_itself_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket() -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(tproxy_routes, "IPRoute", no_socket)
    with pytest.raises(
        tproxy_routes.RoutingError, match=r"opening a netlink socket: .*Too many open"
    ):
        tproxy_routes.remove()
