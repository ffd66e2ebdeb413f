"""Settings: a TOML file (tomllib) with CLI flags on top, validated in one place.

Each key is declared once, as a field below: its type, its default with where that default
comes from, its check, and whether a SIGHUP applies it (``reload=True``; pep.ops.runtime derives
the reload plan from that). ``build`` checks every key through its field, then the rules
between keys; whatever consumes a ``Config`` (the rules, the sockets) takes its values as
valid. Every problem is a ``ConfigError`` naming the key, the value and what is allowed, so an
operator fixes a typo without reading the source. Unknown keys are errors too: a misspelt
``listen_prot`` silently ignored is worse than a refusal to start.

A new key is one field: ``name: T = key(default, check, reload=...)`` with a comment saying
where the default comes from. A new table (``[client]``) is a frozen dataclass of such fields
plus one field here: ``name: Table = key(factory=Table, check=table(Table))`` (ruff's RUF009
cannot tell that key() returns a dataclasses.field: ``# noqa: RUF009`` on that line).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import resource
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pep.config.files import read_small
from pep.config.leg import LegTuning
from pep.config.link import Link
from pep.config.paths import default_status_socket
from pep.config.peer import Peer
from pep.config.policy import Rule, parse_rules
from pep.config.schema import (
    ConfigError,
    Net,
    boolean,
    check_keys,
    choice,
    integer,
    interface_names,
    ip_port,
    key,
    nets,
    seconds,
    table,
)
from pep.support.errors import describe

__all__ = ["Config", "ConfigError", "LegTuning", "build", "load", "read_file"]

LOG_LEVELS = ("debug", "info", "warning", "error")


_leg = table(LegTuning)


@dataclass(frozen=True, slots=True)
class LegOverride:
    """Upstream tuning for destinations in ``dst`` (e.g. the satellite leg's networks)."""

    dst: tuple[Net, ...]
    changes: tuple[tuple[str, Any], ...]  # keys set in the override, applied over [upstream]


def _leg_overrides(key: str, value: object) -> tuple[LegOverride, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, value, "must be an array of tables ([[upstream_override]])")
    out = []
    for i, raw in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(raw, Mapping) or "dst" not in raw:
            raise ConfigError(where, raw, "must be a table with `dst` and upstream tuning keys")
        rest = {k: v for k, v in raw.items() if k != "dst"}
        tuning = _leg(where, rest)
        changes = tuple((k, getattr(tuning, k)) for k in rest)
        out.append(LegOverride(nets(f"{where}.dst", raw["dst"]), changes))
    return tuple(out)


def _queue_range(key: str, value: object) -> str:
    if value == "":
        return ""  # unset: the single `queue`
    m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", value) if isinstance(value, str) else None
    first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
    if not 0 <= first <= last <= 65535:
        raise ConfigError(key, value, 'must be a queue range "A-B" with 0 <= A <= B <= 65535')
    return f"{first}-{last}"


def _route_table(key: str, value: object) -> int:
    number = integer(1, 0xFFFFFFFF)(key, value)
    if number in (253, 254, 255):  # RT_TABLE_DEFAULT/MAIN/LOCAL, include/uapi/linux/rtnetlink.h
        raise ConfigError(key, value, "is one of the kernel's own tables (253-255); pick another")
    return number


def _socket_path(key: str, value: object) -> str:
    # sun_path is 108 bytes including the terminating NUL (include/uapi/linux/un.h), and
    # workers serve theirs at PATH.N (up to ".127").
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise ConfigError(key, value, 'must be an absolute path, or "" for no status socket')
    if len(value.encode()) > 103:
        raise ConfigError(key, value, "is too long for a unix socket (at most 103 bytes)")
    return value


def _log_level(key: str, value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(key, value, f"must be one of {', '.join(LOG_LEVELS)}")
    return value.lower()


_MARK = integer(1, 0xFFFFFFFF)
_QUEUE = integer(0, 65535)


@dataclass(frozen=True, slots=True)
class Config:
    # Required (by ``load``): an unscoped rule would also catch connections to the gateway.
    interfaces: tuple[str, ...] = key((), interface_names)
    # "redirect" (nat REDIRECT + SO_ORIGINAL_DST) works everywhere; "tproxy" (mangle TPROXY +
    # policy routing) keeps the original destination as the socket's own address and allows
    # transparent_source.
    mode: str = key("redirect", choice("redirect", "tproxy"))
    # Which IP versions are split: "ipv4", "ipv6" or "both".
    family: str = key("both", choice("ipv4", "ipv6", "both"))
    # TPROXY mode only: the upstream leg binds the client's address and port, so the server
    # sees the client, not the gateway. The server's replies must route back via this gateway.
    transparent_source: bool = key(False, boolean)
    # TPROXY mode: the mark that sends a packet to the local socket via policy routing
    # (`ip rule fwmark M/M lookup route_table`); must not overlap mark_mask.
    tproxy_mark: int = key(0x10000, _MARK)
    route_table: int = key(1513, _route_table)  # ours only: not 253-255, the kernel's
    listen_port: int = key(5000, integer(1, 65535))
    queue: int = key(0, _QUEUE)
    log_level: str = key("info", _log_level, reload=True)
    # Mark set on split SYNs; the nat rule REDIRECTs only these. Within the mask only, so
    # marks set by other tools survive.
    split_mark: int = key(0x5E9, _MARK)
    mark_mask: int = key(0xFFFF, _MARK)
    # Kernel default NFQNL_QMAX_DEFAULT is 1024 (net/netfilter/nfnetlink_queue.c); SYNs are
    # small and a burst of new connections should not spill into bypass.
    queue_maxlen: int = key(4096, integer(1, 1 << 20))
    # Netlink receive buffer (SO_RCVBUFFORCE); ENOBUFS below it is counted, not fatal.
    queue_rcvbuf: int = key(4 * 1024 * 1024, integer(64 * 1024, 1 << 30))
    # A SYN's record lives until the redirected connection is accepted: milliseconds normally,
    # up to the client's SYN retries (1 s, 3 s, ... tcp_syn_retries) when the listener is slow.
    flow_ttl: float = key(30.0, seconds(0.1, 3600), reload=True)
    flow_table_size: int = key(65536, integer(16, 1 << 24), reload=True)
    # listen() backlog; the kernel caps it at net.core.somaxconn (4096 since Linux 5.4).
    backlog: int = key(4096, integer(1, 65535))
    # HAProxy's documentation suggests "timeout connect 5s"; a satellite leg needs more.
    connect_timeout: float = key(10.0, seconds(0.1, 600), reload=True)
    # Idle connections are closed after this; 0 disables. HAProxy's "timeout client/server"
    # are typically minutes; long-lived idle flows (SSH) should set keepalive instead.
    idle_timeout: float = key(3600.0, seconds(0, 7 * 86400), reload=True)
    # TCP Fast Open (RFC 7413) on both legs: the listener accepts data in SYNs, and the
    # upstream SYN carries the client's first bytes, saving one round trip per connection on
    # the PEP-PEP leg of a satellite link. Off by default: it needs net.ipv4.tcp_fastopen on
    # both ends, and some middleboxes drop SYNs with data (RFC 7413 section 7.1).
    tcp_fastopen: bool = key(False, boolean)
    # How long to wait for the client's first bytes before connecting without them (a
    # server-speaks-first protocol such as SMTP sends nothing first). A LAN client's request
    # follows its handshake within a millisecond or so.
    fastopen_wait: float = key(0.05, seconds(0, 10), reload=True)
    # os.splice pipe size; 1 MiB is the default /proc/sys/fs/pipe-max-size.
    pipe_size: int = key(1024 * 1024, integer(4096, 1 << 30), reload=True)
    # After SIGTERM (new flows already go end to end), live connections get this long to
    # finish before they are reset. Below systemd's default TimeoutStopSec of 90 s; the
    # shipped unit sets TimeoutStopSec=45 to leave room for the rest of the shutdown.
    drain_timeout: float = key(30.0, seconds(0, 86400), reload=True)
    # Unix socket `pep status` reads; "" disables it. /run/pep/pep.sock (/run/pep is the
    # unit's RuntimeDirectory), or /run/pep/netns/NAME/pep.sock in the named netns NAME, so
    # peps in two namespaces of one host do not collide (pep.config.paths).
    status_socket: str = key(factory=default_status_socket, check=_socket_path)
    # "ADDRESS:PORT" of the Prometheus endpoint (e.g. "127.0.0.1:9560"); "" serves none.
    metrics_listen: str = key("", ip_port("no metrics endpoint"))
    # Processes sharing the listener (SO_REUSEPORT), each reading one queue of
    # queue .. queue + workers - 1. One is enough up to a few thousand new connections/s.
    workers: int = key(1, integer(1, 128))
    # "A-B": the SYN rule spreads flows over queues A..B (--queue-balance A:B) and one reader
    # task per queue serves them (shared among the workers); overrides `queue`. "" = `queue`.
    queues: str = key("", _queue_range)
    # Split/bypass policy (pep.config.policy): [[policy]] rules, first match wins. It and the keys
    # down to upstream_override are read per SYN (pep.capture.syn_queue.Decider.configure) or per
    # connection, so a reload applies them to the next one.
    policy: tuple[Rule, ...] = key((), parse_rules, reload=True)
    default_action: str = key("split", choice("split", "bypass"), reload=True)
    # Admission control: at this many live split connections (plus SYNs on their way to the
    # listener), new flows bypass pep instead of being refused; 0 = no limit.
    max_connections: int = key(0, integer(0, 1 << 24), reload=True)
    # "immediate": split a SYN at once. "after-upstream" (strict): hold it in the queue until
    # pep's own upstream connect succeeds, so a refused or unreachable server answers the
    # client itself, end to end.
    syn_verdict: str = key("immediate", choice("immediate", "after-upstream"), reload=True)
    # Strict mode bounds: at most this many SYNs held, each at most this long (then bypassed,
    # never dropped). 3 s covers a GEO handshake and the client's first SYN retransmission
    # (initial RTO 1 s, RFC 6298).
    syn_hold_max: int = key(256, integer(1, 1 << 16), reload=True)
    syn_hold_timeout: float = key(3.0, seconds(0.1, 60), reload=True)
    # Upstream leg copies the client SYN's TOS/traffic class and clamps its MSS to the SYN's.
    mirror_tos: bool = key(False, boolean, reload=True)
    mirror_mss: bool = key(False, boolean, reload=True)
    # The legs' tables (key() returns a dataclasses.field, which ruff cannot see).
    client: LegTuning = key(factory=LegTuning, check=_leg, reload=True)  # noqa: RUF009
    upstream: LegTuning = key(factory=LegTuning, check=_leg, reload=True)  # noqa: RUF009
    upstream_override: tuple[LegOverride, ...] = key((), _leg_overrides, reload=True)
    # The satellite link (pep.config.link): its interface, RTT and rates. pep then sets the initial
    # windows on its routes, sizes and paces the link legs, and shares the link among them.
    # None (no [link] table): none of that, as before the table existed.
    link: Link | None = key(None, table(Link), reload=True)  # noqa: RUF009
    # Pooled connections to a far PEP (connect), or from near PEPs (listen) (pep.config.peer): flows
    # across the link skip the PEP-to-PEP handshake. Restart to change: it owns sockets.
    peer: Peer | None = key(None, table(Peer))  # noqa: RUF009

    def upstream_tuning(self, dst: str) -> LegTuning:
        """The upstream leg's tuning for this destination: first matching override, else default."""
        if self.upstream_override:
            ip = ipaddress.ip_address(dst)
            for o in self.upstream_override:
                if any(ip.version == n.version and ip in n for n in o.dst):
                    return dataclasses.replace(self.upstream, **dict(o.changes))
        return self.upstream

    @property
    def queue_range(self) -> tuple[int, int]:
        """(first, last) NFQUEUE numbers the rules balance over."""
        if self.queues:
            first, _, last = self.queues.partition("-")
            return int(first), int(last or first)
        return self.queue, self.queue + self.workers - 1

    def worker_queues(self, worker: int | None) -> list[int]:
        """The queues one process reads: all of them, or worker N's share of the range."""
        first, last = self.queue_range
        every = list(range(first, last + 1))
        return every if worker is None else every[worker :: self.workers]

    @property
    def families(self) -> tuple[int, ...]:
        """IP versions to split, as 4 and/or 6."""
        return {"ipv4": (4,), "ipv6": (6,), "both": (4, 6)}[self.family]


def build(settings: Mapping[str, object]) -> Config:
    """Validate a flat mapping of settings (file values already merged with CLI overrides):
    each key by its field's check, then the rules between keys."""
    cfg = Config(**check_keys(Config, settings))
    if cfg.transparent_source and cfg.mode != "tproxy":
        raise ConfigError("transparent_source", True, 'requires mode = "tproxy"')
    if cfg.mode == "tproxy" and cfg.tproxy_mark & cfg.mark_mask:
        raise ConfigError(
            "tproxy_mark", hex(cfg.tproxy_mark), f"must not overlap mark_mask {cfg.mark_mask:#x}"
        )
    if cfg.split_mark & ~cfg.mark_mask:
        raise ConfigError(
            "split_mark", hex(cfg.split_mark), f"must lie within mark_mask {cfg.mark_mask:#x}"
        )
    first, last = cfg.queue_range
    if cfg.queues and last - first + 1 < cfg.workers:
        raise ConfigError(
            "queues", cfg.queues, f"needs at least one queue per worker ({cfg.workers})"
        )
    if cfg.queue + cfg.workers - 1 > 65535:
        raise ConfigError("workers", cfg.workers, f"queue {cfg.queue} + workers - 1 exceeds 65535")
    count, most = last - first + 1, max_queues()
    if count > most:
        key_name, value = ("queues", cfg.queues) if cfg.queues else ("workers", cfg.workers)
        raise ConfigError(
            key_name,
            value,
            f"asks for {count} queues; at most {most} here ({QUEUES_PER_CPU} per CPU, within "
            "an eighth of the open-files limit): each is a netlink socket with its own "
            "queue_rcvbuf, and one reader per CPU is as fast as it gets",
        )
    if cfg.peer is not None and (problem := cfg.peer.problem()) is not None:
        raise ConfigError(*problem)
    if cfg.link is not None and (problem := cfg.link.problem()) is not None:
        raise ConfigError(*problem)
    if cfg.workers > 1 and not cfg.status_socket:
        raise ConfigError(
            "status_socket", "", "is needed with workers > 1 (the workers report through it)"
        )
    return cfg


# Queues one machine may read: a reader per CPU keeps up with thousands of SYNs/s each
# (docs/SCALING.md), and a few per CPU leave room to spread the workers; each one costs a
# netlink socket and a receive buffer of queue_rcvbuf (4 MiB by default).
QUEUES_PER_CPU = 4
QUEUES_MIN = 16


def max_queues() -> int:
    """How many queues a configuration may ask for on this machine."""
    most = max(QUEUES_MIN, QUEUES_PER_CPU * (os.cpu_count() or 1))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        most = min(most, max(1, soft // 8))
    return most


# A configuration file is a few kilobytes (deploy/pep.toml, every key commented: 9 KB); one
# larger than this is not one (a device, a log given by mistake), and is refused before it is
# read, not read into memory.
CONFIG_MAX_BYTES = 1 << 20


def read_file(path: str | Path) -> dict[str, object]:
    """Parse a TOML file; syntax errors become ConfigError with the file's name and line. A
    path that is not a regular file (/dev/zero, a FIFO, a directory), or is over
    CONFIG_MAX_BYTES, is refused before anything is read."""
    data = read_small("--config", str(path), CONFIG_MAX_BYTES, what="a configuration")
    try:
        return tomllib.loads(data.decode())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", str(path), f"is not valid TOML: {describe(e)}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 (toml.io, "Spec"); tomllib decodes first
        msg = f"is not valid TOML: not UTF-8 (byte {e.start}: {e.reason})"
        raise ConfigError("--config", str(path), msg) from None


def load(path: str | Path | None, overrides: Mapping[str, object]) -> Config:
    """File settings, then CLI overrides (``None`` values mean "flag not given")."""
    settings = read_file(path) if path is not None else {}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    cfg = build(settings)
    if not cfg.interfaces:
        raise ConfigError(
            "interfaces", [], "at least one ingress interface is required (--interface)"
        )
    return cfg


def log_level_number(level: str) -> int:
    return getattr(logging, level.upper())
