"""Policy routing for TPROXY mode, with pyroute2: the mark that delivers packets locally.

TPROXY hands a packet to a local socket only if routing delivers it locally, so the packets
it marks need ``ip rule fwmark M/M lookup T`` and ``ip route add local default dev lo table
T`` (Documentation/networking/tproxy.rst), per family.

Every rule and route pep adds carries routing protocol number 94 (``proto 94`` in ``ip rule``
and ``ip route`` output; unassigned in iproute2's rt_protos), so removal finds exactly ours,
including those of a crashed run with another table or mark, and nobody else's.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["PEP_PROTO", "RoutingError", "install", "remove", "show"]

PEP_PROTO = 94
_FAMILIES = {4: (socket.AF_INET, "0.0.0.0"), 6: (socket.AF_INET6, "::")}


class RoutingError(RuntimeError):
    """A policy rule or route could not be changed; the message names which and why."""


def install(mark: int, table: int, families: Iterable[int]) -> None:
    """Replace pep's policy rules and local routes with exactly these (idempotent)."""
    remove()
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in families:
            af, any_addr = _FAMILIES[family]
            what = (
                f"ip -{family} rule add fwmark {mark:#x}/{mark:#x} lookup {table} proto {PEP_PROTO}"
            )
            try:
                ipr.rule(
                    "add", family=af, table=table, fwmark=mark, fwmask=mark, FRA_PROTOCOL=PEP_PROTO
                )
                what = f"ip -{family} route add local default dev lo table {table}"
                ipr.route(
                    "add",
                    family=af,
                    dst=any_addr,
                    dst_len=0,
                    type="local",
                    scope="host",
                    oif=lo,
                    table=table,
                    proto=PEP_PROTO,
                )
            except NetlinkError as e:
                remove()
                raise RoutingError(f"`{what}` failed: {e.args[-1]}") from e


def remove() -> int:
    """Delete every policy rule and route with pep's protocol number; returns how many."""
    removed = 0
    with IPRoute() as ipr:
        for af, _ in _FAMILIES.values():
            for rule in ipr.get_rules(family=af):
                if rule.get("FRA_PROTOCOL") == PEP_PROTO:
                    ipr.rule(
                        "del",
                        family=af,
                        priority=rule.get("FRA_PRIORITY"),
                        table=rule.get("FRA_TABLE"),
                        fwmark=rule.get("FRA_FWMARK"),
                        fwmask=rule.get("FRA_FWMASK"),
                    )
                    removed += 1
            for route in ipr.get_routes(family=af, table=None, proto=PEP_PROTO):
                if route["proto"] == PEP_PROTO:
                    ipr.route(
                        "del",
                        family=af,
                        dst=route.get("RTA_DST") or _any(af),
                        dst_len=route["dst_len"],
                        type=route["type"],
                        table=route.get("RTA_TABLE"),
                        oif=route.get("RTA_OIF"),
                        scope=route["scope"],
                        proto=PEP_PROTO,
                    )
                    removed += 1
    return removed


def _any(af: int) -> str:
    return "0.0.0.0" if af == socket.AF_INET else "::"


def show() -> list[str]:
    """pep's policy rules and routes, one line each, in `ip rule`/`ip route` words."""
    lines = []
    with IPRoute() as ipr:
        for family, (af, _) in _FAMILIES.items():
            for rule in ipr.get_rules(family=af):
                if rule.get("FRA_PROTOCOL") == PEP_PROTO:
                    mark, mask = rule.get("FRA_FWMARK", 0), rule.get("FRA_FWMASK", 0)
                    lines.append(
                        f"ip -{family} rule: {rule.get('FRA_PRIORITY')}: fwmark "
                        f"{mark:#x}/{mask:#x} lookup {rule.get('FRA_TABLE')} proto {PEP_PROTO}"
                    )
            for route in ipr.get_routes(family=af, table=None, proto=PEP_PROTO):
                if route["proto"] == PEP_PROTO:
                    lines.append(
                        f"ip -{family} route: local default dev lo table "
                        f"{route.get('RTA_TABLE')} proto {PEP_PROTO}"
                    )
    return lines
