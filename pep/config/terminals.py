"""Terminal plans: the terminals a hub serves over ``[link]``, each with its networks and rates.

A hub's PEP sends to a star of terminals behind one carrier, and each terminal has a service
plan: what the hub may send it and what it may send back. ``[link]`` names them inline
(``[[link.terminals]]``) or, for a fleet of thousands, in a plain text file
(``link.terminals_file``), one terminal a line::

    # NAME   EGRESS   INGRESS   NETWORK [NETWORK ...]   (networks by spaces or commas)
    t1       10mbit   2mbit     10.81.101.0/24 2001:db8:1::/48

Rates are seen from this node, in ``[link]``'s units: ``EGRESS`` what it may send toward the
terminal, ``INGRESS`` what the terminal may send here. Both sources are checked as strictly as
the rest of the config: a bad line is a ``ConfigError`` naming the file and the line number,
so ``pep run`` exits 2 before installing anything and a SIGHUP with a bad file keeps the running
plans (pep.ops.runtime). Between terminals: a name is used once, no two networks overlap (an
address belongs to one terminal), and no plan is above the carrier (``Link.problem``).

``TerminalTable`` answers "which terminal is this address behind" by longest-prefix match:
one dict probe per distinct prefix length in the table, so the cost of a lookup does not grow
with the number of terminals (the sharer asks once per link leg, pep.link.pacer).
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from pep.config import units
from pep.config.files import read_small
from pep.config.schema import ConfigError, Net, key, nets, rate, table
from pep.support.errors import describe

__all__ = [
    "OTHER",
    "Terminal",
    "TerminalTable",
    "TerminalsFile",
    "parse_file",
    "plans_problem",
    "terminal_tables",
    "terminals_file",
]

# [link]'s own limits for a rate (pep.config.link.RATE_MIN/MAX; not imported: link imports this).
_RATE_MIN, _RATE_MAX = 8_000, 400_000_000_000
# Letters, digits, '.', '_', '-': a name is a metrics label value and a word in a line of the
# file, so no whitespace; 64 characters is room for a customer id.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The label under which pep status and the metrics count link legs of addresses in no
# terminal ("(" is not allowed in a name, so it never collides with a terminal's).
# Room for 200,000 terminals at 80 bytes a line (the scale benchmark's hub has 5,000): larger is
# not a plans file, and is refused before it is read.
TERMINALS_MAX_BYTES = 16 << 20
OTHER = "(other)"


def _name(key: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            key, value, "must be a name of 1-64 letters, digits, '.', '_' or '-' (no spaces)"
        )
    return value


_rate = rate(_RATE_MIN, _RATE_MAX)


def _plan_rate(key: str, value: object) -> int:
    """A plan's rate: as [link]'s, with a word for 0 (a plan of nothing starves the terminal)."""
    try:
        zero = isinstance(value, str) and units.parse_rate(value) == 0
    except ValueError:
        zero = False
    if zero:
        raise ConfigError(
            key, value, "is 0: a plan must be at least 8 kbit/s (a terminal with no plan: leave "
            "it out, its flows then share what the terminals leave)"
        )  # fmt: skip
    return _rate(key, value)


@dataclass(frozen=True, slots=True)
class Terminal:
    """One terminal's plan (one ``[[link.terminals]]`` table, or one line of the file)."""

    name: str = key(check=_name)
    networks: tuple[Net, ...] = key(check=nets)  # the addresses behind the terminal
    egress_rate: int = key(check=_plan_rate)  # bit/s this node may send toward it
    ingress_rate: int = key(check=_plan_rate)  # bit/s it may send to this node


_terminal = table(Terminal)


def terminal_tables(key: str, value: object) -> tuple[Terminal, ...]:
    """``[[link.terminals]]``: an array of tables, each a Terminal."""
    if not isinstance(value, list):
        raise ConfigError(key, value, "must be an array of tables ([[link.terminals]])")
    return tuple(_terminal(f"{key}[{i}]", raw) for i, raw in enumerate(value))


class TerminalsFile:
    """The terminals read from ``link.terminals_file``, with the line each came from.

    Equal when the path and the plans are: a SIGHUP after the file changed is a changed
    ``[link]``. Shown by its path in pep status's config (not thousands of terminals)."""

    __slots__ = ("lines", "path", "terminals")

    def __init__(self, path: str, terminals: Sequence[Terminal], lines: Sequence[int]) -> None:
        self.path, self.terminals, self.lines = path, tuple(terminals), tuple(lines)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TerminalsFile):
            return NotImplemented
        return (self.path, self.terminals) == (other.path, other.terminals)

    def __hash__(self) -> int:
        return hash((self.path, self.terminals))

    def __repr__(self) -> str:
        return f"{self.path} ({len(self.terminals)} terminals)"


def terminals_file(key: str, value: object) -> TerminalsFile:
    """``link.terminals_file``: an absolute path, read and checked now (exit 2 at start; on
    SIGHUP a bad file keeps the running plans)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(key, value, "must be an absolute path")
    data = read_small(key, value, TERMINALS_MAX_BYTES, what="a terminals file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(key, value, f"is not UTF-8 text (byte {e.start})") from None
    try:
        terminals, lines = parse_file(text)
    except ValueError as e:
        raise ConfigError(key, value, describe(e)) from None
    return TerminalsFile(value, terminals, lines)


def parse_file(text: str) -> tuple[list[Terminal], list[int]]:
    """The terminals of a plans file and their line numbers; ValueError("line N: ...") on the
    first bad line. ``#`` starts a comment; blank lines are skipped."""
    terminals, lines = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 4:
            raise ValueError(
                f"line {number}: expected NAME EGRESS INGRESS NETWORK [NETWORK ...], "
                f"got {len(words)} field(s): {raw.strip()!r}"
            )
        name, egress, ingress, *networks = words
        try:
            terminals.append(
                Terminal(
                    _name("name", name),
                    nets("network", [n for w in networks for n in w.split(",") if n]),
                    _plan_rate("egress", egress),
                    _plan_rate("ingress", ingress),
                )
            )
        except ConfigError as e:
            raise ValueError(f"line {number}: {e.key} {e.value!r} {e.allowed}") from None
        lines.append(number)
    return terminals, lines


# --- between terminals ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a terminal was declared, for messages: (key, value, prefix of the problem)."""

    key: str
    value: object
    prefix: str


def _sources(
    inline: Sequence[Terminal], file: TerminalsFile | None
) -> Iterator[tuple[Terminal, _Source]]:
    for i, t in enumerate(inline):
        yield t, _Source(f"link.terminals[{i}]", t.name, "")
    if file is not None:
        for t, line in zip(file.terminals, file.lines, strict=True):
            yield t, _Source("link.terminals_file", file.path, f"line {line}: ")


def plans_problem(
    egress: int, ingress: int, inline: Sequence[Terminal], file: TerminalsFile | None
) -> tuple[str, object, str] | None:
    """What is wrong between the terminals and with the carrier (``egress``/``ingress``: the
    link's rates), or None: a name twice, two networks that overlap, a plan above the carrier.
    Sorting makes the overlap check O(n log n) for a fleet of thousands."""
    seen: dict[str, _Source] = {}
    spans: list[tuple[int, int, int, Net, Terminal, _Source]] = []
    for t, where in _sources(inline, file):
        if t.name in seen:
            first = seen[t.name]
            at = f" ({first.prefix.removesuffix(': ') or first.key})"
            return where.key, where.value, f"{where.prefix}terminal {t.name} again{at}"
        seen[t.name] = where
        for direction, mine, carrier in (
            ("egress_rate", t.egress_rate, egress),
            ("ingress_rate", t.ingress_rate, ingress),
        ):
            if mine > carrier:
                return (
                    where.key,
                    where.value,
                    f"{where.prefix}terminal {t.name}: its {direction} "
                    f"{units.format_rate(mine)} is above the link's {direction} "
                    f"{units.format_rate(carrier)} (a plan is a part of the carrier)",
                )
        for net in t.networks:
            start = int(net.network_address)
            spans.append((net.version, start, start + net.num_addresses - 1, net, t, where))
    spans.sort(key=lambda s: (s[0], s[1], s[2]))
    for a, b in itertools.pairwise(spans):
        if a[0] == b[0] and b[1] <= a[2]:
            _, _, _, net_a, ta, wa = a
            _, _, _, net_b, tb, wb = b
            owner = "its own" if ta.name == tb.name else f"terminal {ta.name}'s"
            at = wa.prefix.removesuffix(": ") or wa.key
            return (
                wb.key,
                wb.value,
                f"{wb.prefix}terminal {tb.name}: network {net_b} overlaps {owner} {net_a} "
                f"({at}): an address belongs to one terminal",
            )
    return None


# --- lookup ---------------------------------------------------------------------------------


class TerminalTable:
    """The terminals by name, and by address (longest-prefix match)."""

    def __init__(self, terminals: Iterable[Terminal] = ()) -> None:
        self.by_name: dict[str, Terminal] = {}
        # per IP version: prefix length -> {network number: terminal}, longest lengths first
        self._nets: dict[int, dict[int, dict[int, Terminal]]] = {4: {}, 6: {}}
        for t in terminals:
            self.by_name[t.name] = t
            for net in t.networks:
                bits = self._nets[net.version].setdefault(net.prefixlen, {})
                bits[int(net.network_address) >> (net.max_prefixlen - net.prefixlen)] = t
        self._lengths = {
            v: sorted(by_len, reverse=True) for v, by_len in self._nets.items() if by_len
        }

    def __len__(self) -> int:
        return len(self.by_name)

    def __iter__(self) -> Iterator[Terminal]:
        return iter(self.by_name.values())

    def lookup(self, address: str | None) -> Terminal | None:
        """The terminal whose networks hold ``address`` (an IPv4-mapped IPv6 address counts as
        its IPv4 address), or None: not an address, or in no terminal's networks."""
        if address is None or not self._lengths:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
            ip = ip.ipv4_mapped  # type: ignore[union-attr]
        value, width = int(ip), ip.max_prefixlen
        by_len = self._nets[ip.version]
        for length in self._lengths.get(ip.version, ()):
            found = by_len[length].get(value >> (width - length))
            if found is not None:
                return found
        return None
