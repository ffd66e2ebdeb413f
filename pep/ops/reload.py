"""What a SIGHUP may change in a running daemon: the reload plan (pure), and the listener
retune it needs.

The config is read again and validated as a whole (an invalid file is rejected and the running
configuration stays: pep.ops.runtime). Keys that only a restart can change (the rules, the
sockets, the queues) keep their running value and are named in a warning; only ``RELOADABLE``
keys take effect, for new connections (live ones keep what they started with).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pep.config import Config, ConfigError, LegTuning
from pep.config.link import Link
from pep.config.schema import reloadable
from pep.split.sockopts import apply_tuning
from pep.support.errors import describe

__all__ = [
    "RELOADABLE",
    "ReloadPlan",
    "check_environment",
    "plan_reload",
    "read_reload",
    "reroute",
    "retune_listener",
    "set_link_routes",
]

# Keys a SIGHUP applies: those pep.config declares with ``reload=True``. Everything else is
# fixed at start: it shapes the rules, the queue bindings or the sockets. ``Runtime.apply``
# does what each reloadable key needs (most are read per SYN or per connection).
RELOADABLE = reloadable(Config)
# The client leg is set on the listening socket and inherited by accepted sockets. A buffer
# size or congestion control, once set, cannot be put back to "kernel default" there.
_STICKY_CLIENT = ("sndbuf", "rcvbuf", "congestion")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    config: Config  # new values of the reloadable keys, running values of the rest
    changed: tuple[str, ...]  # applied
    kept: tuple[str, ...]  # changed in the file, but need a restart: not applied


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    changes: dict[str, Any] = {}
    changed: list[str] = []
    kept: list[str] = []
    for f in dataclasses.fields(Config):
        old_value, new_value = getattr(running, f.name), getattr(new, f.name)
        if old_value == new_value:
            continue
        if f.name not in RELOADABLE:
            kept.append(f.name)
            continue
        if f.name == "client":
            sticky = {
                k: getattr(old_value, k)
                for k in _STICKY_CLIENT
                if getattr(new_value, k) is None and getattr(old_value, k) is not None
            }
            kept += [f"client.{k}" for k in sticky]
            new_value = dataclasses.replace(new_value, **sticky)
            if new_value == old_value:
                continue
        changes[f.name] = new_value
        changed.append(f.name)
    return ReloadPlan(dataclasses.replace(running, **changes), tuple(changed), tuple(kept))


def read_reload(
    reload: Callable[[], Config] | None,
    running: Config,
    reloads: dict[str, Any],
    log: logging.Logger,
) -> ReloadPlan | None:
    """A SIGHUP's configuration, read, checked as start checks it and planned against the
    running one; None, logged and counted in ``reloads`` (what ``pep status`` shows), when
    there is none to read or it is refused: the running configuration stays. One place for
    the daemon and a workers master, which checks for its workers."""
    if reload is None:
        log.info("SIGHUP: no configuration to reload")
        return None
    try:
        new = reload()
        check_environment(new)  # what start would refuse: the running config stays
    except ConfigError as e:
        reloads["failed"] += 1
        reloads["last_error"] = describe(e)
        log.error("SIGHUP: reload rejected, the running configuration stays: %s", describe(e))
        return None
    reloads["ok"] += 1
    reloads["last_error"] = None
    return plan_reload(running, new)


def check_environment(cfg: Config) -> None:
    """What a configuration needs besides being valid, checked alike at start (nothing is
    installed when it fails) and on SIGHUP (the running configuration stays): the link's
    interface exists here, the [peer] key file is there, private and long enough. ConfigError
    naming the key."""
    if cfg.link is not None:
        from pep.link import legs

        legs.check(cfg.link)
    if cfg.peer is not None:
        from pep.config.peer import load_key

        load_key(cfg.peer.key_file)


def retune_listener(sock: Any, leg: LegTuning) -> None:
    """Apply client-leg options to a listening socket; new connections inherit them."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(leg.nodelay))
    apply_tuning(sock, leg)


def set_link_routes(link: Link | None) -> None:
    """The link's route metrics (and a terminal's, with plans) as ``link`` says, or none
    without a link: at start and on every SIGHUP, by the process that owns the kernel state
    (the single daemon, or a workers master). Every SIGHUP, not only a changed [link]: a
    route added since is given its windows then (README, "The satellite link").
    RoutingError when the kernel refuses."""
    from pep.kernel import link_routes  # pyroute2: not loaded for a config check
    from pep.link import legs

    if link is None:
        link_routes.remove()  # a previous run's with [link], if any
    else:
        link_routes.install(
            link.interface, legs.route_metrics(link), legs.terminal_route_metrics(link)
        )


def reroute(link: Link | None, log: logging.Logger) -> None:
    """``set_link_routes`` on a SIGHUP: a refusal is logged, the daemon runs on (its rules
    and connections do not depend on the routes' windows)."""
    from pep.kernel.tproxy_routes import RoutingError

    try:
        set_link_routes(link)
    except RoutingError as e:
        log.error("SIGHUP: the link's routes could not be changed: %s", describe(e))
