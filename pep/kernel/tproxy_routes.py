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
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pep.support.errors import describe

__all__ = ["PEP_PROTO", "RoutingError", "install", "remove", "show"]

PEP_PROTO = 94  # a routing protocol number (rtm_protocol) unassigned in iproute2 rt_protos
RTN_LOCAL = 2  # include/uapi/linux/rtnetlink.h: a route that delivers to this host
_FAMILIES = {4: (socket.AF_INET, "0.0.0.0"), 6: (socket.AF_INET6, "::")}
# What pyroute2 raises: the kernel's refusal (NetlinkError), or the socket's own OSError.
_ERRORS = (NetlinkError, OSError)


class RoutingError(RuntimeError):
    """A policy rule or route could not be changed; the message names which and why."""


def install(mark: int, table: int, families: Iterable[int]) -> None:
    """Replace pep's policy rules and local routes with exactly these (idempotent).

    On failure, removes what it added (and whatever else of pep's is there) before raising.
    """
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
                error = RoutingError(f"`{what}` failed: {_reason(e)}")
                try:
                    remove()
                except RoutingError as rollback:
                    error.add_note(f"rollback (remove) also failed: {describe(rollback)}")
                raise error from e


def remove() -> int:
    """Delete every policy rule and route with pep's protocol number; returns how many.

    Best effort: a rule or route the kernel refuses to delete (or a family it cannot list)
    does not stop the others; one :class:`RoutingError` names every failure afterwards.
    """
    removed = 0
    failures: list[str] = []
    try:
        with IPRoute() as ipr:
            for family, (af, any_addr) in _FAMILIES.items():
                try:
                    rules, routes = _ours(ipr, af)
                except _ERRORS as e:
                    failures.append(f"listing pep's IPv{family} rules and routes: {_reason(e)}")
                    continue
                for rule in rules:
                    try:
                        ipr.rule(
                            "del",
                            family=af,
                            priority=rule.get("FRA_PRIORITY"),
                            table=rule.get("FRA_TABLE"),
                            fwmark=rule.get("FRA_FWMARK"),
                            fwmask=rule.get("FRA_FWMASK"),
                        )
                        removed += 1
                    except _ERRORS as e:
                        what = f"ip -{family} rule del {_rule_words(rule)}"
                        failures.append(f"`{what}`: {_reason(e)}")
                for route in routes:
                    try:
                        ipr.route(
                            "del",
                            family=af,
                            dst=route.get("RTA_DST") or any_addr,
                            dst_len=route["dst_len"],
                            type=route["type"],
                            table=route.get("RTA_TABLE"),
                            oif=route.get("RTA_OIF"),
                            scope=route["scope"],
                            proto=PEP_PROTO,
                        )
                        removed += 1
                    except _ERRORS as e:
                        what = f"ip -{family} route del {_route_words(route)}"
                        failures.append(f"`{what}`: {_reason(e)}")
    except _ERRORS as e:  # the netlink socket itself
        failures.append(f"opening a netlink socket: {_reason(e)}")
    if failures:
        raise RoutingError(f"removing pep's policy routing failed: {'; '.join(failures)}")
    return removed


def show() -> list[str]:
    """pep's policy rules and routes, one line each, in `ip rule`/`ip route` words."""
    lines = []
    try:
        with IPRoute() as ipr:
            for family, (af, _) in _FAMILIES.items():
                rules, routes = _ours(ipr, af)
                for rule in rules:
                    lines.append(
                        f"ip -{family} rule: {rule.get('FRA_PRIORITY')}: {_rule_words(rule)}"
                    )
                for route in routes:
                    lines.append(f"ip -{family} route: {_route_words(route)}")
    except _ERRORS as e:
        raise RoutingError(f"reading pep's policy rules and routes failed: {_reason(e)}") from e
    return lines


def _ours(ipr: IPRoute, af: int) -> tuple[list[Any], list[Any]]:
    """One family's policy rules and local routes that carry pep's protocol number. Only
    ``local`` routes are TPROXY's: the unicast routes with pep's tag are the link's initial
    windows (pep.kernel.link_routes), which are restored, never deleted."""
    rules = [r for r in ipr.get_rules(family=af) if r.get("FRA_PROTOCOL") == PEP_PROTO]
    routes = ipr.get_routes(family=af, table=None, proto=PEP_PROTO)
    return rules, [r for r in routes if r["proto"] == PEP_PROTO and r["type"] == RTN_LOCAL]


def _rule_words(rule: Any) -> str:
    mark, mask = rule.get("FRA_FWMARK", 0), rule.get("FRA_FWMASK", 0)
    return f"fwmark {mark:#x}/{mask:#x} lookup {rule.get('FRA_TABLE')} proto {PEP_PROTO}"


def _route_words(route: Any) -> str:
    return f"local default dev lo table {route.get('RTA_TABLE')} proto {PEP_PROTO}"


def _reason(error: Exception) -> str:
    """NetlinkError's args are (errno, strerror text); anything else says it in str()."""
    return str(error.args[-1]) if isinstance(error, NetlinkError) and error.args else str(error)
