"""Settings: a TOML file (tomllib) with CLI flags on top, validated in one place.

Every problem is reported as a ``ConfigError`` naming the key, the value and what is allowed,
so an operator fixes a typo without reading the source. Unknown keys are errors too: a
misspelt ``listen_prot`` silently ignored is worse than a refusal to start.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Config", "ConfigError", "LegTuning", "load"]

LOG_LEVELS = ("debug", "info", "warning", "error")
# IFNAMSIZ 16 incl. NUL; no whitespace, '/' or ':' (the kernel's dev_valid_name), and no '!'
# (iptables reads "! -i" as negation): what passes here, the rules take.
_IFNAME = re.compile(r"^[^\s/:!]{1,15}$")


class ConfigError(ValueError):
    """A setting the daemon refuses; ``str()`` is the message shown to the user."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config: {key} = {value!r}: {allowed}")


@dataclass(frozen=True, slots=True)
class LegTuning:
    """Socket options for one leg of a split connection (client side or upstream side).

    ``None`` means "leave the kernel's default": the sysctls (tcp_rmem/tcp_wmem autotuning,
    tcp_congestion_control) usually know better than a fixed number.
    """

    nodelay: bool = True  # a relay must not add Nagle delay on top of the sender's own
    sndbuf: int | None = None
    rcvbuf: int | None = None
    congestion: str | None = None
    quickack: bool = False  # TCP_QUICKACK: ack at once instead of delayed ACKs
    # TCP_NOTSENT_LOWAT: cap on unsent bytes queued in the socket, so a slow leg holds less
    # data in the kernel (Linux default: unlimited, /proc/sys/net/ipv4/tcp_notsent_lowat).
    notsent_lowat: int | None = None
    # SO_KEEPALIVE with TCP_KEEPIDLE/INTVL/CNT (kernel defaults 7200 s / 75 s / 9 probes).
    keepalive: bool = False
    keepidle: int | None = None
    keepintvl: int | None = None
    keepcnt: int | None = None


@dataclass(frozen=True, slots=True)
class LegOverride:
    """Upstream tuning for destinations in ``dst`` (e.g. the satellite leg's networks)."""

    dst: tuple[Any, ...]  # ipaddress networks
    changes: tuple[tuple[str, Any], ...]  # keys set in the override, applied over [upstream]


@dataclass(frozen=True, slots=True)
class Config:
    interfaces: tuple[str, ...] = ()
    # "redirect" (nat REDIRECT + SO_ORIGINAL_DST) works everywhere; "tproxy" (mangle TPROXY +
    # policy routing) keeps the original destination as the socket's own address and allows
    # transparent_source.
    mode: str = "redirect"
    family: str = "both"  # which IP versions are split: "ipv4", "ipv6" or "both"
    # TPROXY mode only: the upstream leg binds the client's address and port, so the server
    # sees the client, not the gateway. The server's replies must route back via this gateway.
    transparent_source: bool = False
    # TPROXY mode: the mark that sends a packet to the local socket via policy routing
    # (`ip rule fwmark M/M lookup route_table`); must not overlap mark_mask.
    tproxy_mark: int = 0x10000
    route_table: int = 1513
    listen_port: int = 5000
    queue: int = 0
    log_level: str = "info"
    # Mark set on split SYNs; the nat rule REDIRECTs only these. Within the mask only, so
    # marks set by other tools survive.
    split_mark: int = 0x5E9
    mark_mask: int = 0xFFFF
    # Kernel default NFQNL_QMAX_DEFAULT is 1024 (net/netfilter/nfnetlink_queue.c); SYNs are
    # small and a burst of new connections should not spill into bypass.
    queue_maxlen: int = 4096
    # Netlink receive buffer (SO_RCVBUFFORCE); ENOBUFS below it is counted, not fatal.
    queue_rcvbuf: int = 4 * 1024 * 1024
    # A SYN's record lives until the redirected connection is accepted: milliseconds normally,
    # up to the client's SYN retries (1 s, 3 s, ... tcp_syn_retries) when the listener is slow.
    flow_ttl: float = 30.0
    flow_table_size: int = 65536
    # listen() backlog; the kernel caps it at net.core.somaxconn (4096 since Linux 5.4).
    backlog: int = 4096
    # HAProxy's documentation suggests "timeout connect 5s"; a satellite leg needs more.
    connect_timeout: float = 10.0
    # Idle connections are closed after this; 0 disables. HAProxy's "timeout client/server"
    # are typically minutes; long-lived idle flows (SSH) should set keepalive instead.
    idle_timeout: float = 3600.0
    # TCP Fast Open (RFC 7413) on both legs: the listener accepts data in SYNs, and the
    # upstream SYN carries the client's first bytes, saving one round trip per connection on
    # the PEP-PEP leg of a satellite link. Off by default: it needs net.ipv4.tcp_fastopen on
    # both ends, and some middleboxes drop SYNs with data (RFC 7413 section 7.1).
    tcp_fastopen: bool = False
    # How long to wait for the client's first bytes before connecting without them (a
    # server-speaks-first protocol such as SMTP sends nothing first). A LAN client's request
    # follows its handshake within a millisecond or so.
    fastopen_wait: float = 0.05
    # os.splice pipe size; 1 MiB is the default /proc/sys/fs/pipe-max-size.
    pipe_size: int = 1024 * 1024
    # After SIGTERM (new flows already go end to end), live connections get this long to
    # finish before they are reset. Below systemd's default TimeoutStopSec of 90 s; the
    # shipped unit sets TimeoutStopSec=45 to leave room for the rest of the shutdown.
    drain_timeout: float = 30.0
    # Unix socket `pep status` reads; "" disables it. /run/pep is the unit's RuntimeDirectory.
    status_socket: str = "/run/pep/pep.sock"
    # "ADDRESS:PORT" of the Prometheus endpoint (e.g. "127.0.0.1:9560"); "" serves none.
    metrics_listen: str = ""
    # Processes sharing the listener (SO_REUSEPORT), each reading one queue of
    # queue .. queue + workers - 1. One is enough up to a few thousand new connections/s.
    workers: int = 1
    # "A-B": the SYN rule spreads flows over queues A..B (--queue-balance A:B) and one reader
    # task per queue serves them (shared among the workers); overrides `queue`. "" = `queue`.
    queues: str = ""
    # Split/bypass policy (pep.policy): [[policy]] rules, first match wins.
    policy: tuple[Any, ...] = ()
    default_action: str = "split"
    # Admission control: at this many live split connections (plus SYNs on their way to the
    # listener), new flows bypass pep instead of being refused; 0 = no limit.
    max_connections: int = 0
    # "immediate": split a SYN at once. "after-upstream" (strict): hold it in the queue until
    # pep's own upstream connect succeeds, so a refused or unreachable server answers the
    # client itself, end to end.
    syn_verdict: str = "immediate"
    # Strict mode bounds: at most this many SYNs held, each at most this long (then bypassed,
    # never dropped). 3 s covers a GEO handshake and the client's first SYN retransmission
    # (initial RTO 1 s, RFC 6298).
    syn_hold_max: int = 256
    syn_hold_timeout: float = 3.0
    # Upstream leg copies the client SYN's TOS/traffic class and clamps its MSS to the SYN's.
    mirror_tos: bool = False
    mirror_mss: bool = False
    client: LegTuning = field(default_factory=LegTuning)
    upstream: LegTuning = field(default_factory=LegTuning)
    upstream_override: tuple[LegOverride, ...] = ()

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


_LEG_KEYS = {f.name for f in dataclasses.fields(LegTuning)}


def _int(key: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, f"must be an integer between {lo} and {hi}")
    if not lo <= value <= hi:
        raise ConfigError(key, value, f"must be between {lo} and {hi}")
    return value


def _float(key: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, value, f"must be a number of seconds between {lo} and {hi}")
    if not lo <= value <= hi:
        raise ConfigError(key, value, f"must be between {lo} and {hi}")
    return float(value)


def _congestion(key: str, value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]{1,15}", value):
        raise ConfigError(key, value, "must be a congestion control name such as 'cubic' or 'bbr'")
    available = _available_congestion()
    if available is not None and value not in available:
        raise ConfigError(
            key, value, f"is not available on this kernel (available: {' '.join(available)})"
        )
    return value


def _available_congestion() -> list[str] | None:
    try:
        text = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text()
    except OSError:
        return None
    return text.split()


def _leg(key: str, value: object) -> LegTuning:
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, f"must be a table with keys {sorted(_LEG_KEYS)}")
    out: dict[str, Any] = {}
    for name, v in value.items():
        k = f"{key}.{name}"
        if name in ("nodelay", "quickack", "keepalive"):
            out[name] = _bool(k, v)
        elif name in ("sndbuf", "rcvbuf"):
            out[name] = _int(k, v, 4096, 1 << 30)
        elif name == "notsent_lowat":
            out[name] = _int(k, v, 1, 1 << 30)
        elif name in ("keepidle", "keepintvl"):
            out[name] = _int(k, v, 1, 32767)  # MAX_TCP_KEEPIDLE/KEEPINTVL, include/net/tcp.h
        elif name == "keepcnt":
            out[name] = _int(k, v, 1, 127)  # MAX_TCP_KEEPCNT
        elif name == "congestion":
            out[name] = _congestion(k, v)
        else:
            raise ConfigError(k, v, f"unknown key (allowed: {', '.join(sorted(_LEG_KEYS))})")
    return LegTuning(**out)


def _leg_overrides(key: str, value: object) -> tuple[LegOverride, ...]:
    from pep.policy import nets

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


def _policy(key: str, value: object) -> tuple[Any, ...]:
    from pep.policy import parse_rules

    return parse_rules(key, value)


def _interfaces(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(key, value, "must be a non-empty list of interface names")
    for name in value:
        if not isinstance(name, str) or not _IFNAME.match(name):
            allowed = "is not a valid interface name (1-15 chars, no whitespace, '/', ':', '!')"
            raise ConfigError(key, name, allowed)
    if len(set(value)) != len(value):
        raise ConfigError(key, value, "lists an interface twice")
    return tuple(value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value


def _route_table(key: str, value: object) -> int:
    table = _int(key, value, 1, 0xFFFFFFFF)
    if table in (253, 254, 255):  # RT_TABLE_DEFAULT/MAIN/LOCAL, include/uapi/linux/rtnetlink.h
        raise ConfigError(key, value, "is one of the kernel's own tables (253-255); pick another")
    return table


def _choice(*allowed: str) -> Any:
    def check(key: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")
        return value

    return check


def _socket_path(key: str, value: object) -> str:
    # sun_path is 108 bytes including the terminating NUL (include/uapi/linux/un.h), and
    # workers serve theirs at PATH.N (up to ".127").
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise ConfigError(key, value, 'must be an absolute path, or "" for no status socket')
    if len(value.encode()) > 103:
        raise ConfigError(key, value, "is too long for a unix socket (at most 103 bytes)")
    return value


def parse_listen_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9560"`` or ``"[::1]:9560"`` -> (address, port); ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    else:
        ipaddress.IPv4Address(host)
    return host, int(port)


def _listen_address(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, value, 'must be a string "ADDRESS:PORT"')
    if value:
        try:
            parse_listen_address(value)
        except ValueError:
            raise ConfigError(
                key,
                value,
                'must be "IPV4:PORT" or "[IPV6]:PORT" with a port 1-65535, e.g. "127.0.0.1:9560"'
                ', or "" for no metrics endpoint',
            ) from None
    return value


def _log_level(key: str, value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(key, value, f"must be one of {', '.join(LOG_LEVELS)}")
    return value.lower()


# key -> validator returning the typed value
_VALIDATORS: dict[str, Any] = {
    "interfaces": _interfaces,
    "mode": _choice("redirect", "tproxy"),
    "family": _choice("ipv4", "ipv6", "both"),
    "transparent_source": _bool,
    "tproxy_mark": lambda k, v: _int(k, v, 1, 0xFFFFFFFF),
    "route_table": _route_table,
    "listen_port": lambda k, v: _int(k, v, 1, 65535),
    "queue": lambda k, v: _int(k, v, 0, 65535),
    "log_level": _log_level,
    "split_mark": lambda k, v: _int(k, v, 1, 0xFFFFFFFF),
    "mark_mask": lambda k, v: _int(k, v, 1, 0xFFFFFFFF),
    "queue_maxlen": lambda k, v: _int(k, v, 1, 1 << 20),
    "queue_rcvbuf": lambda k, v: _int(k, v, 64 * 1024, 1 << 30),
    "flow_ttl": lambda k, v: _float(k, v, 0.1, 3600),
    "flow_table_size": lambda k, v: _int(k, v, 16, 1 << 24),
    "backlog": lambda k, v: _int(k, v, 1, 65535),
    "connect_timeout": lambda k, v: _float(k, v, 0.1, 600),
    "idle_timeout": lambda k, v: _float(k, v, 0, 7 * 86400),
    "tcp_fastopen": _bool,
    "fastopen_wait": lambda k, v: _float(k, v, 0, 10),
    "pipe_size": lambda k, v: _int(k, v, 4096, 1 << 30),
    "drain_timeout": lambda k, v: _float(k, v, 0, 86400),
    "status_socket": _socket_path,
    "metrics_listen": _listen_address,
    "workers": lambda k, v: _int(k, v, 1, 128),
    "queues": _queue_range,
    "policy": _policy,
    "default_action": _choice("split", "bypass"),
    "max_connections": lambda k, v: _int(k, v, 0, 1 << 24),
    "syn_verdict": _choice("immediate", "after-upstream"),
    "syn_hold_max": lambda k, v: _int(k, v, 1, 1 << 16),
    "syn_hold_timeout": lambda k, v: _float(k, v, 0.1, 60),
    "mirror_tos": _bool,
    "mirror_mss": _bool,
    "client": _leg,
    "upstream": _leg,
    "upstream_override": _leg_overrides,
}
assert set(_VALIDATORS) == {f.name for f in dataclasses.fields(Config)}


def build(settings: Mapping[str, object]) -> Config:
    """Validate a flat mapping of settings (file values already merged with CLI overrides)."""
    typed: dict[str, Any] = {}
    for key, value in settings.items():
        validator = _VALIDATORS.get(key)
        if validator is None:
            raise ConfigError(
                key, value, f"unknown key (allowed: {', '.join(sorted(_VALIDATORS))})"
            )
        typed[key] = validator(key, value)
    cfg = Config(**typed)
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
    if cfg.workers > 1 and not cfg.status_socket:
        raise ConfigError(
            "status_socket", "", "is needed with workers > 1 (the workers report through it)"
        )
    return cfg


def read_file(path: str | Path) -> dict[str, object]:
    """Parse a TOML file; syntax errors become ConfigError with the file's name and line."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", str(path), "file does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", str(path), f"is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 (toml.io, "Spec"); tomllib decodes first
        msg = f"is not valid TOML: not UTF-8 (byte {e.start}: {e.reason})"
        raise ConfigError("--config", str(path), msg) from None
    except OSError as e:
        raise ConfigError("--config", str(path), f"cannot be read: {e.strerror}") from None


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
