"""Which initial windows each route through the link gets when [link] has terminal plans (pure).

The kernel takes a connection's initcwnd/initrwnd from its route, so a hub whose routes carry
the carrier's BDP would open a 10 Mbit/s terminal's legs with a 1 Gbit/s carrier's window.
pep.kernel.link_routes changes the routes through the link; this module decides, from the
routes as pep.kernel.link_routes reads them (its JSON-able specs) and the terminal networks:

- a route whose destination lies within one terminal's network gets that terminal's metrics;
  every other route the carrier's;
- a terminal network that no route names exactly, but a wider route through the link carries
  (a default route, a summary of many terminals), gets a route of its own: a copy of the most
  specific such route in each table that has one, with the network as destination and the
  terminal's metrics. It routes exactly as the wider one did; it is pep's (tagged like the
  routes pep changes), recorded, and deleted on exit.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from pep.config.schema import Net

__all__ = ["Metrics", "plan"]

Metrics = dict[int, dict[str, int]]  # per family (4, 6): {"initcwnd": n, "initrwnd": n}
Spec = dict[str, Any]  # a route as pep.kernel.link_routes reads it


def _net(spec: Spec) -> Net:
    default = "0.0.0.0" if spec["family"] == 4 else "::"
    return ipaddress.ip_network(f"{spec['dst'] or default}/{spec['dst_len']}", strict=False)


def _within(routes: dict[int, dict[int, Any]], net: Net, longest: int) -> Any:
    """The entry of the longest prefix in ``routes`` (length -> {network number: entry}) that
    contains ``net``, at most ``longest`` bits long; None if none does."""
    value = int(net.network_address)
    for length in sorted((n for n in routes if n <= longest), reverse=True):
        found = routes[length].get(value >> (net.max_prefixlen - length))
        if found is not None:
            return found
    return None


def _index(items: Sequence[tuple[Net, Any]]) -> dict[int, dict[int, dict[int, Any]]]:
    """Per IP version: prefix length -> {network number: item}."""
    out: dict[int, dict[int, dict[int, Any]]] = {4: {}, 6: {}}
    for net, item in items:
        by_len = out[net.version].setdefault(net.prefixlen, {})
        by_len[int(net.network_address) >> (net.max_prefixlen - net.prefixlen)] = item
    return out


def plan(
    every: Sequence[Spec],
    interface: int,
    changeable: Sequence[Spec],
    carrier: Metrics,
    terminals: Sequence[tuple[Net, Metrics]],
) -> tuple[list[tuple[Spec, Metrics]], list[tuple[Spec, Metrics]]]:
    """(each ``changeable`` route with the metrics it gets, the routes to add with theirs).

    ``every``: all unicast routes of every table (which route a terminal network takes now is
    decided among all of them, not only those through the link); ``interface``: the link's
    ifindex. A network gets a route of its own only where the route it takes now is through
    the link and not already its own exactly."""
    networks = _index(terminals)
    changed = []
    for spec in changeable:
        net = _net(spec)
        found = _within(networks[net.version], net, net.prefixlen)
        changed.append((spec, found if found is not None else carrier))
    by_table: dict[tuple[int, int], list[tuple[Net, Spec]]] = {}
    for spec in every:
        by_table.setdefault((spec["family"], spec["table"]), []).append((_net(spec), spec))
    added = []
    for (family, _), routes in sorted(by_table.items()):
        if not any(interface in spec["oifs"] for _, spec in routes):
            continue
        index = _index(routes)[family]
        for net, metrics in terminals:
            if net.version != family:
                continue
            exact = index.get(net.prefixlen, {}).get(
                int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
            )
            wider = _within(index, net, net.prefixlen - 1) if exact is None else None
            if wider is not None and interface in wider["oifs"]:
                ours = {**wider, "dst": str(net.network_address), "dst_len": net.prefixlen}
                added.append((ours, metrics))
    return changed, added
