"""Split-or-bypass policy, decided per SYN: first matching rule wins, else the default.

Pure: the SYN reader calls ``Policy.decide`` with the parsed SYN and the ingress interface
name; no IO, so every rule shape is unit-tested. A bypassed flow is accepted unmarked and
routed end to end, untouched by pep (DESIGN.md: the nat/TPROXY rules act on the mark only).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pep.config import ConfigError
from pep.syn import SynInfo

__all__ = ["ACTIONS", "Policy", "PolicyError", "Rule", "describe", "nets", "parse_rules"]

ACTIONS = ("split", "bypass")
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_PORT_RANGE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_RULE_KEYS = ("name", "action", "dst", "src", "dport", "interface")


PolicyError = ConfigError  # a bad rule is a bad config value: same message, same exit code 2


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: str
    dst: tuple[_Net, ...] = ()  # empty: any
    src: tuple[_Net, ...] = ()
    dport: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    interface: tuple[str, ...] = ()

    def matches(self, syn: SynInfo, indev: str | None) -> bool:
        if self.interface and indev not in self.interface:
            return False
        if self.dport and not any(lo <= syn.dport <= hi for lo, hi in self.dport):
            return False
        if self.dst and not _in_any(syn.dst, self.dst):
            return False
        return not self.src or _in_any(syn.src, self.src)


def _in_any(addr: str, nets: tuple[_Net, ...]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == net.version and ip in net for net in nets)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default: str = "split"
    hits: dict[str, int] = field(default_factory=dict, compare=False)

    def decide(self, syn: SynInfo, indev: str | None) -> tuple[str, str]:
        """(action, name of the deciding rule or "default"); counts the decision."""
        for rule in self.rules:
            if rule.matches(syn, indev):
                self.hits[rule.name] = self.hits.get(rule.name, 0) + 1
                return rule.action, rule.name
        self.hits["default"] = self.hits.get("default", 0) + 1
        return self.default, "default"


def nets(key: str, value: object) -> tuple[_Net, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise PolicyError(key, value, "must be a CIDR or a non-empty list of CIDRs")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            msg = "is not an IP network (e.g. 10.0.0.0/8, 2001:db8::/32)"
            raise PolicyError(key, item, msg) from None
    return tuple(out)


def _ports(key: str, value: object) -> tuple[tuple[int, int], ...]:
    items = [value] if isinstance(value, int | str) else value
    if not isinstance(items, list | tuple) or not items:
        raise PolicyError(key, value, "must be a port, a range 'A-B', or a list of them")
    out = []
    for item in items:
        m = _PORT_RANGE.match(str(item)) if not isinstance(item, bool) else None
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if not (1 <= lo <= hi <= 65535):
            raise PolicyError(key, item, "must be a port 1-65535 or a range 'A-B' with A <= B")
        out.append((lo, hi))
    return tuple(out)


def _names(key: str, value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list | tuple)
        or not items
        or not all(isinstance(i, str) and i for i in items)
    ):
        raise PolicyError(key, value, "must be an interface name or a list of them")
    return tuple(items)


def parse_rules(key: str, rules: object) -> tuple[Rule, ...]:
    """Validate the config's ``[[policy]]`` tables (``key`` is "policy")."""
    if not isinstance(rules, list | tuple):
        raise PolicyError(key, rules, "must be an array of tables ([[policy]])")
    parsed = []
    for i, raw in enumerate(rules):
        where = f"{key}[{i}]"
        if not isinstance(raw, Mapping):
            raise PolicyError(where, raw, "must be a table with keys " + ", ".join(_RULE_KEYS))
        for k in raw:
            if k not in _RULE_KEYS:
                allowed = "unknown key (allowed: " + ", ".join(_RULE_KEYS) + ")"
                raise PolicyError(f"{where}.{k}", raw[k], allowed)
        action = raw.get("action")
        if action not in ACTIONS:
            raise PolicyError(f"{where}.action", action, f"must be one of {', '.join(ACTIONS)}")
        name = raw.get("name", f"rule{i}")
        if not isinstance(name, str) or not name or name == "default":
            raise PolicyError(f"{where}.name", name, "must be a non-empty string, not 'default'")
        kw: dict[str, Any] = {}
        for k, conv in (("dst", nets), ("src", nets), ("dport", _ports), ("interface", _names)):
            if k in raw:
                kw[k] = conv(f"{where}.{k}", raw[k])
        parsed.append(Rule(name=name, action=action, **kw))
    names = [r.name for r in parsed]
    if len(set(names)) != len(names):
        raise PolicyError(key, names, "rule names must be unique")
    return tuple(parsed)


def describe(policy: Policy) -> list[str]:
    """One line per rule, for the log at start and at reload."""
    lines = []
    for r in policy.rules:
        conds = []
        if r.dst:
            conds.append("dst in " + ",".join(map(str, r.dst)))
        if r.src:
            conds.append("src in " + ",".join(map(str, r.src)))
        if r.dport:
            conds.append(
                "dport in " + ",".join(f"{a}-{b}" if a != b else str(a) for a, b in r.dport)
            )
        if r.interface:
            conds.append("interface in " + ",".join(r.interface))
        lines.append(
            f"{r.name}: {r.action} " + (("if " + " and ".join(conds)) if conds else "always")
        )
    lines.append(f"default: {policy.default}")
    return lines
