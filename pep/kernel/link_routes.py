"""Initial windows for the link: initcwnd/initrwnd on the routes that leave through it.

The kernel reads a new connection's initial congestion window and initial receive window from its
route (RTAX_INITCWND / RTAX_INITRWND); there is no per-socket equivalent. So while pep runs, each
route through ``[link] interface`` is replaced (pyroute2) by a copy that carries pep.config.link's
metrics and pep's routing protocol number 94 (pep.kernel.tproxy_routes.PEP_PROTO: ``proto 94`` in
``ip route``), and the original is put back exactly on exit.

What was there before is written to a state file before the first route changes, so the next
start or ``pep rules remove`` restores it after a crash (kill -9, power loss within a boot: the
file lives under /run). Without the file (deleted by hand), a tagged route gets pep's metrics
taken off and the protocol ``boot`` back (what ``ip route add`` sets), and a warning says so.

Left alone: the kernel's own routes (``proto kernel``: the connected subnet, which the kernel
deletes with its address; ``proto ra``: router advertisements, which it expires), routes in
the ``local`` table, and routes with attributes this module does not reproduce (encapsulation,
nexthop objects, an expiry): changing one of those could not be undone exactly. A route added
later (a DHCP renewal) gets the metrics at the next SIGHUP or restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pep.config import paths
from pep.config.schema import Net
from pep.kernel import terminal_routes
from pep.kernel.tproxy_routes import PEP_PROTO, RoutingError
from pep.support.errors import describe

__all__ = ["STATE_FILE", "LinkRoutes", "install", "remove", "route_text", "routes", "show"]

log = logging.getLogger(__name__)

STATE_FILE = "link-routes.json"  # in the namespace's runtime directory (pep.config.paths)
RTPROT_REDIRECT, RTPROT_KERNEL, RTPROT_BOOT, RTPROT_RA = 1, 2, 3, 9  # rtnetlink.h
RT_TABLE_LOCAL = 255
RTN_UNICAST = 1
_KERNELS_OWN = (RTPROT_REDIRECT, RTPROT_KERNEL, RTPROT_RA)
_METRICS = ("initcwnd", "initrwnd")
_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}
# Attributes a route may carry that a copy made here would lose: such routes are skipped.
_UNSUPPORTED = {"RTA_ENCAP", "RTA_ENCAP_TYPE", "RTA_NH_ID", "RTA_EXPIRES", "RTA_VIA"}


def routes() -> LinkRoutes:
    """pep's route changes in this namespace, with their recovery file."""
    return LinkRoutes(Path(paths.runtime_dir()) / STATE_FILE)


def install(
    interface: str,
    metrics: dict[int, dict[str, int]],
    terminals: Sequence[tuple[Net, dict[int, dict[str, int]]]] = (),
) -> None:
    """Initial windows (``metrics`` per family, from pep.config.link.Link.route_metrics) on every
    route through ``interface``, replacing an earlier run's; with terminal plans, the routes to
    each terminal network get its plan's (pep.kernel.terminal_routes)."""
    routes().apply(interface, metrics, terminals)


def remove() -> int:
    """Put back the routes pep changed (a step of pep.kernel.cleanup)."""
    return routes().restore()


def show() -> list[str]:
    return routes().show()


@dataclass(frozen=True)
class LinkRoutes:
    """pep's changes to the routes through one interface; ``state`` is the recovery file."""

    state: Path

    def apply(
        self,
        interface: str,
        metrics: dict[int, dict[str, int]],
        terminals: Sequence[tuple[Net, dict[int, dict[str, int]]]] = (),
    ) -> list[dict[str, Any]]:
        """Give every route through ``interface`` these metrics (per family: 4/6), or its
        terminal's (``terminals``: each terminal network's metrics; a network that only a
        wider route carries gets a route of its own, pep.kernel.terminal_routes), after
        putting back whatever an earlier run left. Returns the originals (what `show` and the
        status report). Raises RoutingError naming the route when one cannot be changed; what
        was changed by then is put back first."""
        self.restore()
        with IPRoute() as ipr:
            index = _ifindex(ipr, interface)
            every = _routes(ipr)
            originals = [spec for spec in every if spec["oifs"] and index in spec["oifs"]]
            originals = [s for s in originals if _changeable(s)]
            changed, added = terminal_routes.plan(every, index, originals, metrics, terminals)
            if not originals and not added:
                return []
            self._write(originals, [spec for spec, _ in added])
            done: list[tuple[dict[str, Any], bool]] = []  # (route, added by pep)
            steps = [(s, m, False) for s, m in changed] + [(s, m, True) for s, m in added]
            for spec, mine, new in steps:
                ours = dict(
                    spec, proto=PEP_PROTO, metrics={**spec["metrics"], **mine[spec["family"]]}
                )
                try:
                    _replace(ipr, ours)
                except NetlinkError as e:
                    for back, ours_only in done:
                        with contextlib.suppress(NetlinkError):
                            _delete(ipr, back) if ours_only else _replace(ipr, back)
                    self._unlink()
                    raise RoutingError(
                        f"cannot set initcwnd/initrwnd on `{route_text(spec)}`: {e.args[-1]}"
                    ) from None
                done.append((spec, new))
        log.info(
            "link %s: initial windows set on %d route(s): %s",
            interface,
            len(originals),
            "; ".join(route_text(s) for s in originals),
        )
        if added:
            log.info(
                "link %s: %d route(s) added for terminal networks that only a wider route "
                "carried (their plans' initial windows; deleted on exit)",
                interface,
                len(added),
            )
        return originals

    def restore(self) -> int:
        """Put back every route pep changed (this run's or a crashed one's); returns how many.
        Best effort: a route that cannot be put back is reported in a RoutingError after the
        others were."""
        saved, added = self._read()
        failures = []
        restored = 0
        with IPRoute() as ipr:
            tagged = [
                s for s in _routes(ipr) if s["proto"] == PEP_PROTO and s["type"] == RTN_UNICAST
            ]
            by_key = {_key(s): s for s in saved}
            ours = {_key(s) for s in added}
            for spec in tagged:
                if _key(spec) in ours:  # a terminal network's own route: pep added it
                    try:
                        _delete(ipr, spec)
                        restored += 1
                    except NetlinkError as e:
                        failures.append(f"`{route_text(spec)}` (to delete): {e.args[-1]}")
                    continue
                original = by_key.get(_key(spec))
                if original is None:
                    original = dict(
                        spec,
                        proto=RTPROT_BOOT,
                        metrics={k: v for k, v in spec["metrics"].items() if k not in _METRICS},
                    )
                    log.warning(
                        "route `%s` carries pep's tag but no record of its original: taking "
                        "pep's initcwnd/initrwnd off and setting proto boot",
                        route_text(spec),
                    )
                try:
                    _replace(ipr, original)
                    restored += 1
                except NetlinkError as e:
                    failures.append(f"`{route_text(original)}`: {e.args[-1]}")
        self._unlink()
        if failures:
            raise RoutingError("cannot restore route(s): " + "; ".join(failures))
        return restored

    def show(self) -> list[str]:
        """The routes pep changed, as they are now, one line each."""
        with IPRoute() as ipr:
            return [
                route_text(s)
                for s in _routes(ipr)
                if s["proto"] == PEP_PROTO and s["type"] == RTN_UNICAST
            ]

    # --- the state file ------------------------------------------------------------------------

    def _write(self, originals: list[dict[str, Any]], added: list[dict[str, Any]]) -> None:
        paths.ensure_dir(str(self.state.parent))
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps({"routes": originals, "added": added}, indent=1))
        os.replace(tmp, self.state)  # the whole record or none: a crash never leaves half

    def _read(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the routes pep changed, as they were; the routes pep added)."""
        try:
            data = json.loads(self.state.read_text())
            routes, added = data["routes"], data.get("added", [])
            assert isinstance(routes, list) and isinstance(added, list)
            return routes, added
        except FileNotFoundError:
            return [], []
        except (OSError, ValueError, KeyError, AssertionError) as e:
            log.warning("ignoring unreadable route state %s: %s", self.state, describe(e))
            return [], []

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state.unlink()


def _ifindex(ipr: IPRoute, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise RoutingError(f"link interface {interface!r} does not exist")
    return int(found[0])


def _routes(ipr: IPRoute) -> list[dict[str, Any]]:
    """Every unicast route outside the local table, as plain dicts (JSON-able specs)."""
    out = []
    try:
        for af, family in _FAMILIES.items():
            for msg in ipr.get_routes(family=af, table=None):
                spec = _spec(msg, family)
                if spec is not None:
                    out.append(spec)
    except NetlinkError as e:
        raise RoutingError(f"cannot read the routing table: {e.args[-1]}") from None
    return out


def _spec(msg: Any, family: int) -> dict[str, Any] | None:
    table = msg.get("RTA_TABLE") or msg["table"]
    if table == RT_TABLE_LOCAL or msg["type"] != RTN_UNICAST:
        return None
    names = {name for name, _ in msg["attrs"]}
    metrics = msg.get("RTA_METRICS")
    hops = msg.get("RTA_MULTIPATH")
    multipath = None
    oifs = [msg.get("RTA_OIF")] if msg.get("RTA_OIF") is not None else []
    if hops:
        multipath = [
            {"gateway": h.get("RTA_GATEWAY"), "oif": h["oif"], "hops": h["hops"]} for h in hops
        ]
        oifs = [h["oif"] for h in hops]
    return {
        "family": family,
        "table": table,
        "dst": msg.get("RTA_DST"),
        "dst_len": msg["dst_len"],
        "tos": msg["tos"],
        "priority": msg.get("RTA_PRIORITY"),
        "gateway": msg.get("RTA_GATEWAY"),
        "oifs": oifs,
        "prefsrc": msg.get("RTA_PREFSRC"),
        "proto": msg["proto"],
        "scope": msg["scope"],
        "type": msg["type"],
        "flags": msg["flags"],
        "pref": msg.get("RTA_PREF"),
        "metrics": {
            name.removeprefix("RTAX_").lower(): value
            for name, value in (metrics["attrs"] if metrics else [])
        },
        "multipath": multipath,
        "unsupported": sorted(names & _UNSUPPORTED),
    }


def _changeable(spec: dict[str, Any]) -> bool:
    if spec["proto"] in _KERNELS_OWN:
        return False
    if spec["unsupported"]:
        log.warning(
            "link: leaving route `%s` alone (it has %s, which pep would not restore exactly)",
            route_text(spec),
            ", ".join(spec["unsupported"]),
        )
        return False
    return True


def _key(spec: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a route for replacement (fib: dst, tos, priority, table)."""
    return (
        spec["family"],
        spec["table"],
        spec["dst"],
        spec["dst_len"],
        spec["tos"],
        spec["priority"],
    )


def _identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What names a route to netlink (the fib key, as ``_key``), as pyroute2 arguments."""
    af = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
    kwargs: dict[str, Any] = {
        "family": af,
        "dst": spec["dst"] or ("::" if af == socket.AF_INET6 else "0.0.0.0"),
        "dst_len": spec["dst_len"],
        "tos": spec["tos"],
        "table": spec["table"],
    }
    if spec["priority"] is not None:
        kwargs["priority"] = spec["priority"]
    return kwargs


def _replace(ipr: IPRoute, spec: dict[str, Any]) -> None:
    kwargs = _identity(spec)
    kwargs.update(proto=spec["proto"], scope=spec["scope"], type=spec["type"], flags=spec["flags"])
    for key in ("gateway", "prefsrc"):
        if spec[key] is not None:
            kwargs[key] = spec[key]
    if spec["multipath"]:
        kwargs["multipath"] = spec["multipath"]
    elif spec["oifs"]:
        kwargs["oif"] = spec["oifs"][0]
    if spec["pref"] is not None:
        kwargs["pref"] = spec["pref"]
    if spec["metrics"]:
        kwargs["metrics"] = spec["metrics"]
    ipr.route("replace", **kwargs)


def _delete(ipr: IPRoute, spec: dict[str, Any]) -> None:
    """Delete a route pep added (proto 94 only: never someone else's with the same key; and
    its scope, which the kernel matches unless told "nowhere")."""
    ipr.route("del", **_identity(spec), proto=PEP_PROTO, scope=spec["scope"])


def route_text(spec: dict[str, Any]) -> str:
    """A route in `ip route` words (for logs, errors and `pep rules show`)."""
    dst = "default" if not spec["dst_len"] else f"{spec['dst']}/{spec['dst_len']}"
    parts = [f"ip -{spec['family']} route {dst}"]
    if spec["gateway"]:
        parts.append(f"via {spec['gateway']}")
    if spec["multipath"]:
        parts.append("nexthops " + ",".join(str(h["gateway"]) for h in spec["multipath"]))
    parts.append(f"table {spec['table']}")
    if spec["priority"] is not None:
        parts.append(f"metric {spec['priority']}")
    parts.append(f"proto {spec['proto']}")
    parts += [f"{name} {value}" for name, value in sorted(spec["metrics"].items())]
    return " ".join(parts)
