"""Split-or-bypass policy, decided per SYN: first matching rule wins, else the default.

Pure: the SYN reader calls ``Policy.decide`` with the parsed SYN and the ingress interface
name; no IO, so every rule shape is unit-tested. A bypassed flow is accepted unmarked and
routed end to end, untouched by pep (DESIGN.md: the nat/TPROXY rules act on the mark only).
The keys of a ``[[policy]]`` table are ``Rule``'s fields, declared with pep.config.schema.key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pep.config.schema import ConfigError, Net, choice, interface_names, key, nets, ports, table

__all__ = ["ACTIONS", "Policy", "PolicyError", "Rule", "Syn", "parse_rules"]

ACTIONS = ("split", "bypass")

PolicyError = ConfigError  # a bad rule is a bad config value: same message, same exit code 2


class Syn(Protocol):
    """What a rule reads of a SYN (pep.capture.syn.SynInfo has it)."""

    @property
    def src(self) -> str: ...
    @property
    def dst(self) -> str: ...
    @property
    def dport(self) -> int: ...


def _rule_name(key: str, value: object) -> str:
    if not isinstance(value, str) or not value or value == "default":
        raise PolicyError(key, value, "must be a non-empty string, not 'default'")
    return value


@dataclass(frozen=True, slots=True)
class Rule:
    name: str = key(check=_rule_name)  # parse_rules names an unnamed rule "rule<index>"
    action: str = key(check=choice(*ACTIONS))
    dst: tuple[Net, ...] = key((), nets)  # empty: any
    src: tuple[Net, ...] = key((), nets)
    dport: tuple[tuple[int, int], ...] = key((), ports)  # inclusive ranges
    interface: tuple[str, ...] = key((), interface_names)

    def matches(self, syn: Syn, indev: str | None) -> bool:
        if self.interface and indev not in self.interface:
            return False
        if self.dport and not any(lo <= syn.dport <= hi for lo, hi in self.dport):
            return False
        if self.dst and not _in_any(syn.dst, self.dst):
            return False
        return not self.src or _in_any(syn.src, self.src)


def _in_any(addr: str, nets: tuple[Net, ...]) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == net.version and ip in net for net in nets)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default: str = "split"
    hits: dict[str, int] = field(default_factory=dict, compare=False)

    def decide(self, syn: Syn, indev: str | None) -> tuple[str, str]:
        """(action, name of the deciding rule or "default"); counts the decision."""
        for rule in self.rules:
            if rule.matches(syn, indev):
                self.hits[rule.name] = self.hits.get(rule.name, 0) + 1
                return rule.action, rule.name
        self.hits["default"] = self.hits.get("default", 0) + 1
        return self.default, "default"


_check_rule = table(Rule)


def parse_rules(key: str, rules: object) -> tuple[Rule, ...]:
    """Check the config's ``[[policy]]`` tables (``key`` is "policy")."""
    if not isinstance(rules, list | tuple):
        raise PolicyError(key, rules, "must be an array of tables ([[policy]])")
    parsed = []
    for i, raw in enumerate(rules):
        named = {"name": f"rule{i}", **raw} if isinstance(raw, Mapping) else raw
        parsed.append(_check_rule(f"{key}[{i}]", named))
    names = [r.name for r in parsed]
    if len(set(names)) != len(names):
        raise PolicyError(key, names, "rule names must be unique")
    return tuple(parsed)
