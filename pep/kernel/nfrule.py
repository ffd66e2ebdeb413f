"""One netfilter rule, described once: rendered to iptables-save text and to python-iptables.

pep's rules (:mod:`pep.kernel.rule_plan`) and the lab link's (:mod:`pep.lab.link_rules`) are
:class:`NfRule` values. :meth:`NfRule.line` is the line ``pep rules show`` prints for the rule once
installed, :meth:`NfRule.build` the python-iptables object that installs it, and
:mod:`pep.kernel.rule_show` reads an installed rule back into an :class:`NfRule`, so what is
planned, what is logged and what is shown all go through this one renderer and cannot drift apart.

A match's or target's options are kept as python-iptables reports them
(``Match.get_all_parameters``): the option name without ``--`` and its words, a leading ``"!"``
word for negation. Those are the words iptables-save prints after ``--name`` and the words
python-iptables' ``set_parameter`` parses, so one list serves both directions. Pure: nothing
here imports python-iptables; :meth:`NfRule.build` is handed the module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["Ext", "NfRule", "comment", "ext"]

Words = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ext:
    """A match or a target: extension name, its options in iptables-save's order, revision."""

    name: str
    params: tuple[tuple[str, Words], ...] = ()
    revision: int | None = None  # None: python-iptables' default lookup


def ext(name: str, *, revision: int | None = None, **options: str | Sequence[str]) -> Ext:
    """An :class:`Ext` from keyword options, in order: ``queue_num="0"`` is ``--queue-num 0``,
    ``dst_type="!LOCAL"`` is ``! --dst-type LOCAL``, ``""`` is a flag without a value and a
    sequence gives several words (``tcp_flags=("FIN,SYN,RST,ACK", "SYN")``)."""
    params = []
    for key, value in options.items():
        if isinstance(value, str):
            words: Words = ("!", value[1:]) if value.startswith("!") else (value,) if value else ()
        else:
            words = tuple(value)
        params.append((key.replace("_", "-"), words))
    return Ext(name, tuple(params), revision)


def comment(text: str) -> Ext:
    """``-m comment --comment TEXT``: whose rule it is, for a human reading iptables-save."""
    return ext("comment", comment=text)


@dataclass(frozen=True, slots=True)
class NfRule:
    """One rule of one table and chain; ``None`` fields are not matched on.

    The address and interface fields take python-iptables' spelling, a leading ``!`` negating
    (``"!eth3"``); addresses as iptables-save prints them (``10.0.0.0/8``, ``192.0.2.1/32``).
    ``protocol`` ``None`` is any protocol (python-iptables' ``"ip"``).
    """

    table: str
    chain: str
    target: Ext | None  # None: no -j (a rule that only counts)
    matches: tuple[Ext, ...] = ()
    protocol: str | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    source: str | None = None
    destination: str | None = None
    goto: bool = False  # -g (continue in the caller's caller on RETURN) instead of -j
    family: int = 4  # 4: iptables, 6: ip6tables

    def spec(self) -> str:
        """The rule as iptables-save prints it after ``-A CHAIN``."""
        parts = _negatable("-s", self.source) + _negatable("-d", self.destination)
        parts += _negatable("-i", self.in_interface) + _negatable("-o", self.out_interface)
        parts += _negatable("-p", self.protocol)
        for match in self.matches:
            parts += ["-m", match.name, *_words(match.params)]
        if self.target is not None:
            parts += ["-g" if self.goto else "-j", self.target.name, *_words(self.target.params)]
        return " ".join(parts)

    def save_line(self) -> str:
        """``-A CHAIN SPEC``: the line ``iptables-save`` (or ``iptables -t TABLE -S``) prints."""
        return f"-A {self.chain} {self.spec()}"

    def line(self) -> str:
        """``[-6 ]-t TABLE -A CHAIN SPEC``: one line of ``pep rules show``, any table."""
        return f"{'-6 ' if self.family == 6 else ''}-t {self.table} {self.save_line()}"

    def build(self, iptc: ModuleType) -> Any:
        """The python-iptables rule (``iptc.Rule`` or ``iptc.Rule6``) for this description.

        Raises what python-iptables raises for an option it cannot parse (ValueError,
        XTablesError) or an extension it cannot load; the caller names the rule with
        :meth:`line`. A jump to a user chain builds only once the chain exists in one of the
        process's table handles (python-iptables checks the target name against them).
        """
        rule = (iptc.Rule if self.family == 4 else iptc.Rule6)()
        for attr, value in (
            ("protocol", self.protocol),
            ("src", self.source),
            ("dst", self.destination),
            ("in_interface", self.in_interface),
            ("out_interface", self.out_interface),
        ):
            if value is not None:
                setattr(rule, attr, value)
        for match in self.matches:
            _set_params(rule.create_match(match.name, revision=match.revision), match.params)
        if self.target is not None:
            target = self.target
            _set_params(rule.create_target(target.name, target.revision, self.goto), target.params)
        return rule


def _set_params(extension: Any, params: tuple[tuple[str, Words], ...]) -> None:
    for key, words in params:
        # A flag (no words) is parsed from one empty argument, as python-iptables' own
        # ``match.transparent = ""`` does.
        extension.set_parameter(key, list(words) if words else "")


def _negatable(flag: str, value: str | None) -> list[str]:
    if not value:
        return []
    if value.startswith("!"):
        return ["!", flag, value[1:]]
    return [flag, value]


def _quote(word: str) -> str:
    """iptables-save quotes a word with blanks or quotes in it (xtables_save_string)."""
    if word and not re.search(r"[\s\"']", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _words(params: tuple[tuple[str, Words], ...]) -> list[str]:
    out: list[str] = []
    for key, words in params:
        if words and words[0] == "!":
            out.append("!")
            words = words[1:]
        out.append(f"--{key}")
        out.extend(_quote(w) for w in words)
    return out
