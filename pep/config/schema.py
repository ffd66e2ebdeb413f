"""How a setting is declared and checked: ``key`` declares it, ``table`` checks a TOML table of
such keys, and the checkers turn one raw TOML value into its typed value.

A key is declared once, as a dataclass field (pep.config's ``Config``, ``LegTuning``,
pep.config.policy's ``Rule``) carrying its default, its checker and whether a SIGHUP applies it; the
parsing, the "unknown key" message and the reload plan are all derived from those fields
(pyroute2's nla_map style: described once, used every way). Values that appear in several
places (a CIDR, a port range, an interface name) have one checker each, here.

Every problem is a ``ConfigError`` naming the key, the value and what is allowed. This module
imports nothing of pep but pep.config.units and pep.support, so every table of pep.config
builds on it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pep.config import units  # a leaf module: no import cycle
from pep.support.errors import describe

__all__ = [
    "Check",
    "ConfigError",
    "Net",
    "available_congestion",
    "boolean",
    "check_keys",
    "choice",
    "congestion",
    "duration",
    "integer",
    "interface_name",
    "interface_names",
    "ip_port",
    "key",
    "nets",
    "parse_listen_address",
    "ports",
    "rate",
    "reloadable",
    "seconds",
    "table",
]

Check = Callable[[str, object], Any]  # (dotted key, raw TOML value) -> typed value
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

# IFNAMSIZ 16 incl. NUL; no whitespace, '/' or ':' (the kernel's dev_valid_name), and no '!'
# (iptables reads "! -i" as negation). The one rule for interface names, wherever they appear.
_IFNAME = re.compile(r"^[^\s/:!]{1,15}$")
_PORT_RANGE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


class ConfigError(ValueError):
    """A setting the daemon refuses; ``str()`` is the message shown to the user."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config: {key} = {value!r}: {allowed}")


# --- declaring keys


def key(
    default: Any = dataclasses.MISSING,
    check: Check | None = None,
    *,
    factory: Callable[[], Any] | None = None,
    reload: bool = False,
) -> Any:
    """A dataclass field that is a settings key: its default (or ``factory``; neither: the
    key is required), the ``check`` its raw value must pass, and whether SIGHUP applies it.

    ``reload`` is False unless stated: a new key is restart-only until someone decides what a
    reload must do for it (pep.ops.runtime), so a reload never half-applies something new.
    """
    if check is None:
        raise TypeError("key() needs a check")
    meta = {"check": check, "reload": reload}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def _declared(cls: type) -> dict[str, dataclasses.Field[Any]]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in fields.items():
        if "check" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{name} is not declared with key()")
    return fields


def reloadable(cls: type) -> frozenset[str]:
    """Names of ``cls``'s keys declared with ``reload=True``."""
    return frozenset(n for n, f in _declared(cls).items() if f.metadata["reload"])


def check_keys(cls: type, settings: Mapping[str, object], prefix: str = "") -> dict[str, Any]:
    """Each setting through its key's check, named ``prefix + key`` in errors: the typed
    values for ``cls(**...)``. Unknown keys are refused first (a misspelt key silently
    ignored is worse than a refusal), then a required key that is missing."""
    fields = _declared(cls)
    for name, value in settings.items():
        if name not in fields:
            allowed = f"unknown key (allowed: {', '.join(sorted(fields))})"
            raise ConfigError(f"{prefix}{name}", value, allowed)
    typed = {n: fields[n].metadata["check"](f"{prefix}{n}", v) for n, v in settings.items()}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in typed:
            raise ConfigError(f"{prefix}{name}", None, "is required (it has no default)")
    return typed


def table(cls: type) -> Check:
    """The check for a TOML table whose keys are ``cls``'s fields (declared with ``key``)."""

    def check(key: str, value: object) -> Any:
        if not isinstance(value, Mapping):
            allowed = f"must be a table with keys {', '.join(sorted(_declared(cls)))}"
            raise ConfigError(key, value, allowed)
        return cls(**check_keys(cls, value, f"{key}."))

    return check


# --- checkers


def integer(lo: int, hi: int) -> Check:
    def check(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, f"must be an integer between {lo} and {hi}")
        if not lo <= value <= hi:
            raise ConfigError(key, value, f"must be between {lo} and {hi}")
        return value

    return check


def seconds(lo: float, hi: float) -> Check:
    def check(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, f"must be a number of seconds between {lo} and {hi}")
        if not lo <= value <= hi:
            raise ConfigError(key, value, f"must be between {lo} and {hi}")
        return float(value)

    return check


def boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value


def choice(*allowed: str) -> Check:
    def check(key: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")
        return value

    return check


def interface_name(key: str, value: object) -> str:
    """One interface name the kernel and iptables take."""
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise ConfigError(
            key, value, "is not a valid interface name (1-15 chars, no whitespace, '/', ':', '!')"
        )
    return value


def _listed(key: str, value: object, example: str) -> None:
    """A single string where a list is expected is refused, not taken as a list of one: TOML
    has lists, and a key that quietly takes either shape is one typo away from a surprise."""
    if isinstance(value, str):
        raise ConfigError(key, value, f"must be a list, e.g. [{value!r}] ({example})")


def interface_names(key: str, value: object) -> tuple[str, ...]:
    """A non-empty list of distinct names, each one the kernel and iptables take."""
    _listed(key, value, "a list of interface names")
    items = value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(key, value, "must be a non-empty list of interface names")
    for name in items:
        interface_name(key, name)
    if len(set(items)) != len(items):
        raise ConfigError(key, value, "lists an interface twice")
    return tuple(items)


def nets(key: str, value: object) -> tuple[Net, ...]:
    """A non-empty list of networks ("10.0.0.0/8", "2001:db8::/32"; a bare address is its
    /32 or /128). Host bits set ("10.0.0.1/8") are refused: which was meant, the network or
    the host, is the operator's to say."""
    _listed(key, value, "a list of networks")
    items = value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(key, value, "must be a non-empty list of CIDRs")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item))
        except ValueError as e:
            if "host bits set" in str(e):
                network = ipaddress.ip_network(item, strict=False)
                host = str(item).partition("/")[0]
                msg = f"has host bits set: write {network} for the network, or {host} for the host"
                raise ConfigError(key, item, msg) from None
            msg = "is not an IP network (e.g. 10.0.0.0/8, 2001:db8::/32)"
            raise ConfigError(key, item, msg) from None
        except TypeError:
            msg = "is not an IP network (e.g. 10.0.0.0/8, 2001:db8::/32)"
            raise ConfigError(key, item, msg) from None
    return tuple(out)


def ports(key: str, value: object) -> tuple[tuple[int, int], ...]:
    """Ports and "A-B" ranges, as inclusive (low, high) pairs."""
    items = [value] if isinstance(value, int | str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(key, value, "must be a port, a range 'A-B', or a list of them")
    out = []
    for item in items:
        m = _PORT_RANGE.match(str(item)) if not isinstance(item, bool) else None
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if not (1 <= lo <= hi <= 65535):
            raise ConfigError(key, item, "must be a port 1-65535 or a range 'A-B' with A <= B")
        out.append((lo, hi))
    return tuple(out)


def rate(lo: int, hi: int) -> Check:
    """A rate with its unit, "20mbit" (decimal, as tc counts): bit/s between ``lo`` and ``hi``."""
    return _measured(units.parse_rate, units.format_rate, lo, hi)


def duration(lo: float, hi: float) -> Check:
    """A duration with its unit, "600ms" or "0.6s": seconds between ``lo`` and ``hi``."""
    return _measured(units.parse_duration, units.format_duration, lo, hi)


def _measured(
    parse: Callable[[str], Any], fmt: Callable[[float], str], lo: float, hi: float
) -> Check:
    def check(key: str, value: object) -> Any:
        try:
            parsed = parse(value)  # type: ignore[arg-type]
        except ValueError as e:
            raise ConfigError(key, value, describe(e)) from None
        if not lo <= parsed <= hi:
            raise ConfigError(key, value, f"must be between {fmt(lo)} and {fmt(hi)}")
        return parsed

    return check


def ip_port(empty: str) -> Check:
    """ "IPV4:PORT" or "[IPV6]:PORT" (numeric: no resolver), or "" meaning ``empty``."""

    def check(key: str, value: object) -> str:
        if not isinstance(value, str):
            raise ConfigError(key, value, 'must be a string "ADDRESS:PORT"')
        if value:
            try:
                parse_listen_address(value)
            except ValueError:
                raise ConfigError(
                    key,
                    value,
                    'must be "IPV4:PORT" or "[IPV6]:PORT" with a port 1-65535, e.g. '
                    f'"127.0.0.1:9560", or "" for {empty}',
                ) from None
        return value

    return check


def available_congestion() -> list[str] | None:
    """The kernel's loaded congestion controls (None when /proc cannot say)."""
    try:
        text = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text()
    except OSError:
        return None
    return text.split()


def congestion(key: str, value: object) -> str:
    """A congestion control name this kernel has."""
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]{1,15}", value):
        raise ConfigError(key, value, "must be a congestion control name such as 'cubic' or 'bbr'")
    available = available_congestion()
    if available is not None and value not in available:
        raise ConfigError(
            key, value, f"is not available on this kernel (available: {' '.join(available)})"
        )
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
