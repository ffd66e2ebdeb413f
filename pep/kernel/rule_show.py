"""Reading pep's installed rules back (``pep rules show``), and the python-iptables access that
reading and writing (:mod:`pep.kernel.iptables_setup`) share.

An installed rule is read into a :class:`pep.kernel.nfrule.NfRule` and printed by the same renderer
that describes the wanted rules, so ``show`` after an install equals
:func:`pep.kernel.rule_plan.expected_rules` line for line, and both equal what ``iptables-legacy
-S`` prints. python-iptables is not thread-safe (and reading a rule briefly redirects file
descriptor 1 to capture extension output): call these from the main thread only.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from pep.kernel.nfrule import Ext, NfRule
from pep.kernel.rule_plan import HOOK_CHAIN, MANGLE, NAT, check_prefix, own_chains

__all__ = ["RulesError", "read_rule", "show"]


class RulesError(RuntimeError):
    """Installing, removing or reading pep's rules failed (message names the rule and cause)."""


# --------------------------------------------------------------------------------------------
# python-iptables access


def iptc_module() -> ModuleType:
    """Import python-iptables lazily: importing it loads libiptc/libxtables, which may fail."""
    try:
        import iptc
    except Exception as e:  # XTablesError, OSError, ImportError: all mean "unusable here"
        raise RulesError(
            f"python-iptables is not usable: {type(e).__name__}: {error_text(e)}"
        ) from e
    return iptc


def error_text(error: BaseException) -> str:
    """python-iptables formats C strings as ``b'...'`` into its messages; show plain text."""
    return re.sub(r"""\bb(['"])(.*?)\1""", r"\2", str(error))


def iptc_errors() -> tuple[type[BaseException], ...]:
    """What python-iptables raises for a refused or unbuildable rule."""
    iptc = iptc_module()
    # ValueError: python-iptables raises it for rules it cannot build; OSError: fd 1 juggling.
    return (iptc.IPTCError, iptc.XTablesError, ValueError, OSError)


@contextmanager
def fresh_table(name: str, family: int = 4) -> Iterator[Any]:
    """Yield a python-iptables table with autocommit off, freshly read from the kernel.

    python-iptables caches one Table object per name for the whole process, and with autocommit
    on every change is committed (and the table re-read) on its own. We switch autocommit off
    *before* ``refresh()`` (with it on, refresh commits whatever the handle holds), so changes are
    batched into one ``commit()`` by the caller. On the way out, anything not committed is
    discarded by a final refresh, and the cached object's autocommit setting is restored.
    """
    iptc = iptc_module()
    try:
        table = iptc.Table(name) if family == 4 else iptc.Table6(name)
    except iptc_errors() as e:
        tool = "iptables" if family == 4 else "ip6tables"
        raise RulesError(f"{tool} table {name!r} is not available: {error_text(e)}") from e
    previous = table.autocommit
    table.autocommit = False
    try:
        table.refresh()
    except iptc_errors() as e:
        table.autocommit = previous
        raise RulesError(f"cannot read iptables table {name!r}: {error_text(e)}") from e
    try:
        yield table
    finally:
        try:
            table.refresh()  # drop uncommitted changes; next reader starts from kernel state
        except iptc_errors():
            pass
        table.autocommit = previous


def own_jumps(table: Any, owns: list[str]) -> list[Any]:
    """Rules in PREROUTING whose target (jump or goto) is one of our chains, in order."""
    hook = iptc_module().Chain(table, HOOK_CHAIN)
    return [r for r in hook.rules if r.target is not None and r.target.name in owns]


def in_family_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh interpreter (multiprocessing "spawn").

    libxtables keeps one global registry of extensions: once a target such as REDIRECT or
    TPROXY is loaded for IPv4, python-iptables cannot load it for IPv6 in the same process
    (it reports "can't find target" or exits with "already registered"; python-iptables
    issues #135, #316: "only use one address family per process"). So every family's work
    runs in its own short-lived process, and the caller (the daemon) never loads libxtables.
    A child inherits the caller's network namespace.
    """
    ctx = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            return pool.submit(fn, *args).result()
    except concurrent.futures.process.BrokenProcessPool as e:
        raise RulesError(f"the python-iptables worker process died ({fn.__name__}{args})") from e


def family_usable(family: int) -> bool:
    """IPv6 may be disabled in the kernel (ipv6.disable=1): then there is nothing to manage."""
    return family == 4 or os.path.isdir("/proc/sys/net/ipv6")


# --------------------------------------------------------------------------------------------
# reading


def show(chain_prefix: str = "PEP", family: int = 4) -> list[str]:
    """pep's installed rules in iptables-save syntax: jumps from ``PREROUTING``, then our chains.

    One line per rule, each starting with ``-t TABLE -A CHAIN`` (``-6 -t ...`` for ip6tables);
    mangle first, then nat. An empty list when nothing is installed.
    """
    check_prefix(chain_prefix)
    if not family_usable(family):
        return []
    return in_family_process(_show_family, chain_prefix, family)


def _show_family(chain_prefix: str, family: int) -> list[str]:
    errors = iptc_errors()
    iptc = iptc_module()
    lines: list[str] = []
    for table_name in (MANGLE, NAT):
        owns = own_chains(table_name, chain_prefix)
        with fresh_table(table_name, family) as table:
            try:
                for rule in own_jumps(table, owns):
                    lines.append(read_rule(table_name, HOOK_CHAIN, rule, family).line())
                for own in owns:
                    if table.is_chain(own):
                        for rule in iptc.Chain(table, own).rules:
                            lines.append(read_rule(table_name, own, rule, family).line())
            except errors as e:
                raise RulesError(f"reading pep's {table_name} rules failed: {error_text(e)}") from e
    return lines


def read_rule(table: str, chain: str, rule: Any, family: int = 4) -> NfRule:
    """An installed python-iptables rule as the description that renders it like iptables-save.

    python-iptables names protocol 0 ``ip`` (iptables-save omits it) and gives addresses as
    ``10.0.0.0/255.0.0.0`` (iptables-save: ``10.0.0.0/8``, and nothing for ``0.0.0.0/0``).
    """
    protocol = rule.protocol
    if not protocol or protocol.lstrip("!") in ("ip", "all", "0"):
        protocol = None
    target = rule.target
    return NfRule(
        table,
        chain,
        _read_ext(target) if target is not None and target.name else None,
        tuple(_read_ext(m) for m in rule.matches),
        protocol=protocol,
        in_interface=rule.in_interface or None,
        out_interface=rule.out_interface or None,
        source=_address(rule.src),
        destination=_address(rule.dst),
        goto=bool(target is not None and target.goto),
        family=family,
    )


def _read_ext(extension: Any) -> Ext:
    params = extension.get_all_parameters()
    return Ext(extension.name, tuple((key, tuple(words)) for key, words in params.items()))


def _address(value: str | None) -> str | None:
    if not value:
        return None
    neg = value.startswith("!")
    net = ipaddress.ip_network(value.lstrip("!"), strict=False)
    if net.prefixlen == 0:
        return None
    return ("!" if neg else "") + net.with_prefixlen
