"""Install and remove pep's netfilter rules (REDIRECT mode) through python-iptables.

What gets installed, for ``chain_prefix="PEP"``, interface ``eth1`` and queue 0, in iptables-save
syntax (python-iptables writes the *legacy* backend: look with ``iptables-legacy -t mangle -S``)::

    -t mangle -N PEP_SYN
    -t mangle -A PREROUTING -i eth1 -p tcp -m comment --comment pep -j PEP_SYN
    -t mangle -A PEP_SYN -p tcp -m addrtype ! --dst-type LOCAL
              -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE --queue-num 0 --queue-bypass
    -t nat -N PEP_REDIRECT
    -t nat -A PREROUTING -i eth1 -p tcp -m comment --comment pep -j PEP_REDIRECT
    -t nat -A PEP_REDIRECT -p tcp -m mark --mark 0x5e9/0xffff -j REDIRECT --to-ports 8888

Why it looks like this:

- **Own chains.** Everything pep adds lives in chains it owns (``<prefix>_SYN`` in mangle,
  ``<prefix>_REDIRECT`` in nat), plus one jump per ingress interface from ``PREROUTING``. So
  removal is exact (flush and delete our chains, delete the jumps whose target is one of them),
  install is idempotent, and stale rules left by a crashed run -- even ones for interfaces or
  queues no longer configured -- are found by their jump target and replaced. pep never flushes
  a chain it did not create and never touches another rule in ``PREROUTING``. The jumps are
  inserted at the top of ``PREROUTING`` so a user's earlier ``ACCEPT`` cannot hide them.
- **Tagging.** Chain names are ``f"{chain_prefix}_SYN"`` / ``f"{chain_prefix}_REDIRECT"``;
  every jump also carries ``-m comment --comment {chain_prefix.lower()}`` (``pep`` by default) so
  a human reading ``iptables-save`` sees whose it is. Ownership is decided by the jump *target*,
  not the comment: a jump to our chain is ours whatever its comment says. Distinct prefixes let
  two instances coexist; the prefix's chain names belong to pep.
- **--queue-bypass.** It makes the SYN reader fail open: if the daemon dies and no reader is
  bound to the queue, the kernel accepts the SYN unmarked, the nat chain does not redirect it,
  and the connection is simply routed end to end. Without it, SYNs are dropped and clients hang
  (checked).
- **Interface scope.** An unscoped REDIRECT also catches connections addressed to the gateway
  itself (checked), so both chains are entered only for packets arriving on the configured
  ingress interfaces; and the SYN rule skips destinations of address type LOCAL, so
  connections to the gateway itself (or straight to pep's listener) are never split.
- **REDIRECT only on the mark.** The SYN reader decides per flow (bypass lists, admission control
  at capacity) by marking the SYN or not; the nat rule redirects only marked flows, so policy
  changes need no rule changes at run time.

Each table is changed in one libiptc commit (``autocommit`` off), so an install either replaces
the table's pep rules completely or leaves them as they were. The mangle and nat tables are two
commits; if the second fails, :func:`install` rolls back with :func:`remove` before raising.
python-iptables is not thread-safe (and ``show`` briefly redirects file descriptor 1 to read
extension output): call these functions from the main thread at startup/shutdown only.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["RuleSpec", "RulesError", "install", "remove", "show"]

MANGLE = "mangle"
NAT = "nat"
HOOK_CHAIN = "PREROUTING"

# Chain names are at most 28 characters (XT_EXTENSION_MAXNAMELEN 29 with the NUL); the longest
# suffix is "_REDIRECT" (9), which leaves 19 for the prefix.
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,18}$")
# IFNAMSIZ is 16 with the NUL; '+' is iptables' wildcard suffix and is allowed.
_IFNAME = re.compile(r"^[^\s/:!]{1,15}$")


class RulesError(RuntimeError):
    """Installing, removing or reading pep's rules failed (message names the rule and cause)."""


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """What to install; validated on construction so a bad config fails before the kernel does.

    ``queues`` is ``(first, last)``: equal numbers give ``--queue-num first``, a range gives
    ``--queue-balance first:last``. ``split_mark`` must lie within ``mark_mask`` because the nat
    rule matches ``--mark split_mark/mark_mask``.
    """

    interfaces: tuple[str, ...]
    queues: tuple[int, int]
    listen_port: int
    split_mark: int
    mark_mask: int
    chain_prefix: str = "PEP"
    mode: str = "redirect"  # or "tproxy"
    families: tuple[int, ...] = (4,)  # 4 -> iptables, 6 -> ip6tables
    tproxy_mark: int = 0x10000  # TPROXY mode: mark routed to the local socket

    def __post_init__(self) -> None:
        if isinstance(self.interfaces, str):
            raise ValueError(
                f"RuleSpec.interfaces must be a sequence of names, not the string "
                f"{self.interfaces!r}"
            )
        interfaces = tuple(self.interfaces)
        if not interfaces:
            raise ValueError(
                "RuleSpec.interfaces is empty: at least one ingress interface is required "
                "(an unscoped REDIRECT would also catch connections to the gateway itself)"
            )
        for name in interfaces:
            if not isinstance(name, str) or not _IFNAME.match(name):
                raise ValueError(
                    f"RuleSpec.interfaces: {name!r} is not a valid interface name "
                    "(1-15 characters, no whitespace, '/', ':' or '!')"
                )
        if len(set(interfaces)) != len(interfaces):
            raise ValueError(f"RuleSpec.interfaces lists an interface twice: {interfaces!r}")
        # Frozen dataclass: normalise a list given by a caller to the declared tuple type.
        object.__setattr__(self, "interfaces", interfaces)

        queues = tuple(self.queues)
        if (
            len(queues) != 2
            or not all(isinstance(q, int) and 0 <= q <= 0xFFFF for q in queues)
            or queues[0] > queues[1]
        ):
            raise ValueError(
                f"RuleSpec.queues must be (first, last) with 0 <= first <= last <= 65535, "
                f"got {self.queues!r}"
            )
        object.__setattr__(self, "queues", queues)

        if not 1 <= self.listen_port <= 0xFFFF:
            raise ValueError(f"RuleSpec.listen_port must be 1..65535, got {self.listen_port!r}")
        if not 1 <= self.mark_mask <= 0xFFFFFFFF:
            raise ValueError(f"RuleSpec.mark_mask must be 1..0xffffffff, got {self.mark_mask!r}")
        if not 1 <= self.split_mark <= 0xFFFFFFFF or self.split_mark & ~self.mark_mask:
            raise ValueError(
                f"RuleSpec.split_mark {self.split_mark!r} must be non-zero and lie within "
                f"mark_mask {self.mark_mask:#x}"
            )
        _check_prefix(self.chain_prefix)
        if self.mode not in ("redirect", "tproxy"):
            raise ValueError(f"RuleSpec.mode must be 'redirect' or 'tproxy', got {self.mode!r}")
        families = tuple(self.families)
        if (
            not families
            or any(f not in (4, 6) for f in families)
            or len(set(families)) != len(families)
        ):
            raise ValueError(
                f"RuleSpec.families must be a non-empty subset of (4, 6), got {families!r}"
            )
        object.__setattr__(self, "families", families)
        if self.mode == "tproxy" and (
            not 1 <= self.tproxy_mark <= 0xFFFFFFFF or self.tproxy_mark & self.mark_mask
        ):
            raise ValueError(
                f"RuleSpec.tproxy_mark {self.tproxy_mark:#x} must be non-zero and outside "
                f"mark_mask {self.mark_mask:#x}"
            )


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ValueError(
            f"chain_prefix {prefix!r} must be 1-19 characters of letters, digits, '_' or '-', "
            "starting with a letter (chain names are limited to 28 characters)"
        )


def syn_chain(prefix: str = "PEP") -> str:
    """Name of pep's mangle chain (SYN -> NFQUEUE; in TPROXY mode also marked SYN -> TPROXY)."""
    return f"{prefix}_SYN"


def redirect_chain(prefix: str = "PEP") -> str:
    """Name of pep's nat chain (marked -> REDIRECT), REDIRECT mode only."""
    return f"{prefix}_REDIRECT"


def divert_chain(prefix: str = "PEP") -> str:
    """Name of pep's mangle chain for packets of TPROXY'd flows (-m socket -> local)."""
    return f"{prefix}_DIVERT"


def comment_tag(prefix: str = "PEP") -> str:
    """The ``-m comment`` text on pep's jump rules: the prefix in lower case (``pep``)."""
    return prefix.lower()


def _own_chains(table: str, prefix: str) -> list[str]:
    """Every chain pep may own in ``table``, whatever the mode: removal finds stale ones too."""
    if table == MANGLE:
        return [divert_chain(prefix), syn_chain(prefix)]
    return [redirect_chain(prefix)]


# --------------------------------------------------------------------------------------------
# python-iptables access


def _iptc() -> ModuleType:
    """Import python-iptables lazily: importing it loads libiptc/libxtables, which may fail."""
    try:
        import iptc
    except Exception as e:  # XTablesError, OSError, ImportError: all mean "unusable here"
        raise RulesError(f"python-iptables is not usable: {type(e).__name__}: {_text(e)}") from e
    return iptc


def _text(error: BaseException) -> str:
    """python-iptables formats C strings as ``b'...'`` into its messages; show plain text."""
    return re.sub(r"""\bb(['"])(.*?)\1""", r"\2", str(error))


def _iptc_errors() -> tuple[type[BaseException], ...]:
    iptc = _iptc()
    # ValueError: python-iptables raises it for rules it cannot build; OSError: fd 1 juggling.
    return (iptc.IPTCError, iptc.XTablesError, ValueError, OSError)


@contextmanager
def _table(name: str, family: int = 4) -> Iterator[Any]:
    """Yield a python-iptables table with autocommit off, freshly read from the kernel.

    python-iptables caches one Table object per name for the whole process, and with autocommit
    on every change is committed (and the table re-read) on its own. We switch autocommit off
    *before* ``refresh()`` (with it on, refresh commits whatever the handle holds), so changes are
    batched into one ``commit()`` by the caller. On the way out, anything not committed is
    discarded by a final refresh, and the cached object's autocommit setting is restored.
    """
    iptc = _iptc()
    try:
        table = iptc.Table(name) if family == 4 else iptc.Table6(name)
    except _iptc_errors() as e:
        tool = "iptables" if family == 4 else "ip6tables"
        raise RulesError(f"{tool} table {name!r} is not available: {_text(e)}") from e
    previous = table.autocommit
    table.autocommit = False
    try:
        table.refresh()
    except _iptc_errors() as e:
        table.autocommit = previous
        raise RulesError(f"cannot read iptables table {name!r}: {_text(e)}") from e
    try:
        yield table
    finally:
        try:
            table.refresh()  # drop uncommitted changes; next reader starts from kernel state
        except _iptc_errors():
            pass
        table.autocommit = previous


def _jump_target(rule: Any) -> str:
    target = rule.target
    return target.name if target is not None else ""


def _own_jumps(table: Any, own: str | list[str]) -> list[Any]:
    """Rules in PREROUTING whose target (jump or goto) is (one of) our chain(s), in order."""
    owns = [own] if isinstance(own, str) else own
    hook = _iptc().Chain(table, HOOK_CHAIN)
    return [r for r in hook.rules if _jump_target(r) in owns]


# --------------------------------------------------------------------------------------------
# the wanted rules


@dataclass(frozen=True, slots=True)
class _Op:
    """One change to a table: a description for error messages and the code that makes it.

    Every op reads the table state it needs when it runs, so the list can be applied either as
    one batch or op by op with a commit after each (to find which one the kernel refuses).
    """

    what: str
    apply: Callable[[Any], None]


def _rule_text(table: str, chain: str, body: str, family: int = 4) -> str:
    return f"{'-6 ' if family == 6 else ''}-t {table} -A {chain} {body}"


def _mark_text(mark: int, mask: int) -> str:
    return f"{mark:#x}" if mask == 0xFFFFFFFF else f"{mark:#x}/{mask:#x}"


@dataclass(frozen=True, slots=True)
class _Rule:
    """One wanted rule: its iptables-save body and how python-iptables builds it."""

    body: str
    build: Callable[[Any], Any]  # given iptc.Rule or iptc.Rule6, returns the rule


@dataclass(frozen=True, slots=True)
class _ChainPlan:
    table: str
    chain: str
    jumps: tuple[_Rule, ...]  # in PREROUTING, targeting ``chain``, in this order
    rules: tuple[_Rule, ...]  # the chain's content, in this order


def _rule(rule_cls: Any, **fields: str) -> Any:
    rule = rule_cls()
    rule.protocol = fields.get("protocol", "tcp")
    if "in_interface" in fields:
        rule.in_interface = fields["in_interface"]
    return rule


def _jump(iface: str | None, own: str, prefix: str) -> _Rule:
    scope = f"-i {iface} " if iface else ""

    def build(rule_cls: Any) -> Any:
        rule = _rule(rule_cls, **({"in_interface": iface} if iface else {}))
        rule.create_match("comment").comment = comment_tag(prefix)
        rule.create_target(own)
        return rule

    return _Rule(f"{scope}-p tcp -m comment --comment {comment_tag(prefix)} -j {own}", build)


def _queue_rule(spec: RuleSpec) -> _Rule:
    first, last = spec.queues
    queue = f"--queue-num {first}" if first == last else f"--queue-balance {first}:{last}"

    def build(rule_cls: Any) -> Any:
        rule = _rule(rule_cls)
        # Connections to the gateway's own addresses (ssh to the box, or pep's listener port
        # itself) are not forwarded traffic: never queue, mark or redirect them.
        rule.create_match("addrtype").dst_type = "!LOCAL"
        rule.create_match("tcp").tcp_flags = ["FIN,SYN,RST,ACK", "SYN"]
        target = rule.create_target("NFQUEUE")
        if first == last:
            target.queue_num = str(first)
        else:
            target.queue_balance = f"{first}:{last}"
        target.queue_bypass = ""
        return rule

    return _Rule(
        "-p tcp -m addrtype ! --dst-type LOCAL -m tcp --tcp-flags FIN,SYN,RST,ACK SYN "
        f"-j NFQUEUE {queue} --queue-bypass",
        build,
    )


def _redirect_rule(spec: RuleSpec) -> _Rule:
    def build(rule_cls: Any) -> Any:
        rule = _rule(rule_cls)
        rule.create_match("mark").mark = f"{spec.split_mark:#x}/{spec.mark_mask:#x}"
        rule.create_target("REDIRECT").to_ports = str(spec.listen_port)
        return rule

    mark = _mark_text(spec.split_mark, spec.mark_mask)
    return _Rule(f"-p tcp -m mark --mark {mark} -j REDIRECT --to-ports {spec.listen_port}", build)


def _tproxy_rule(spec: RuleSpec, family: int) -> _Rule:
    tmark = f"{spec.tproxy_mark:#x}/{spec.tproxy_mark:#x}"

    def build(rule_cls: Any) -> Any:
        rule = _rule(rule_cls)
        rule.create_match("mark").mark = f"{spec.split_mark:#x}/{spec.mark_mask:#x}"
        # Revision 1 serves both families; python-iptables' default lookup misses it for IPv6.
        target = rule.create_target("TPROXY", revision=1)
        target.on_port = str(spec.listen_port)
        target.tproxy_mark = tmark
        return rule

    mark = _mark_text(spec.split_mark, spec.mark_mask)
    any_ip = "0.0.0.0" if family == 4 else "::"
    return _Rule(
        f"-p tcp -m mark --mark {mark} -j TPROXY --on-port {spec.listen_port} "
        f"--on-ip {any_ip} --tproxy-mark {tmark}",
        build,
    )


def _divert_rules(spec: RuleSpec) -> tuple[_Rule, _Rule]:
    tmark = f"{spec.tproxy_mark:#x}/{spec.tproxy_mark:#x}"

    def mark(rule_cls: Any) -> Any:
        rule = _rule(rule_cls)
        rule.create_match("socket").transparent = ""
        rule.create_target("MARK").set_xmark = tmark
        return rule

    def accept(rule_cls: Any) -> Any:
        rule = _rule(rule_cls, protocol="ip")
        rule.create_match("mark").mark = tmark
        rule.create_target("ACCEPT")
        return rule

    return (
        _Rule(f"-p tcp -m socket --transparent -j MARK --set-xmark {tmark}", mark),
        _Rule(f"-m mark --mark {tmark} -j ACCEPT", accept),
    )


def _plan(spec: RuleSpec, family: int) -> list[_ChainPlan]:
    """pep's chains for one family, in the order their jumps appear in PREROUTING.

    REDIRECT mode: the SYN reader marks a SYN and ACCEPTs it; nat PREROUTING (a later hook)
    REDIRECTs marked flows. TPROXY mode: an ACCEPT verdict would end the mangle chain before a
    TPROXY rule could see the SYN, so the reader answers NF_REPEAT with the mark instead; the
    SYN re-enters mangle PREROUTING and the first rule of our chain TPROXYs it. Later packets
    of a TPROXY'd flow (both legs, and the server's replies with ``transparent_source``) are
    found by ``-m socket --transparent`` on any interface and routed to the local socket by
    the mark.
    """
    prefix = spec.chain_prefix
    syn = syn_chain(prefix)
    syn_jumps = tuple(_jump(iface, syn, prefix) for iface in spec.interfaces)
    if spec.mode == "redirect":
        red = redirect_chain(prefix)
        return [
            _ChainPlan(MANGLE, syn, syn_jumps, (_queue_rule(spec),)),
            _ChainPlan(
                NAT,
                red,
                tuple(_jump(iface, red, prefix) for iface in spec.interfaces),
                (_redirect_rule(spec),),
            ),
        ]
    div = divert_chain(prefix)
    return [
        _ChainPlan(MANGLE, div, (_jump(None, div, prefix),), _divert_rules(spec)),
        _ChainPlan(MANGLE, syn, syn_jumps, (_tproxy_rule(spec, family), _queue_rule(spec))),
    ]


def expected_rules(spec: RuleSpec, family: int = 4) -> list[str]:
    """The lines :func:`show` returns once ``spec`` is installed (iptables-save syntax)."""
    plans = _plan(spec, family)
    out = []
    for table in (MANGLE, NAT):
        mine = [p for p in plans if p.table == table]
        for plan in mine:
            out += [_rule_text(table, HOOK_CHAIN, j.body, family) for j in plan.jumps]
        order = _own_chains(table, spec.chain_prefix)
        for plan in sorted(mine, key=lambda p: order.index(p.chain)):
            out += [_rule_text(table, plan.chain, r.body, family) for r in plan.rules]
    return out


def _install_ops(table_name: str, spec: RuleSpec, family: int = 4) -> list[_Op]:
    """The ops that make ``table_name`` hold exactly pep's rules for ``spec``.

    Every rule is built here, before anything is changed, so a missing userspace extension
    (e.g. libxt_NFQUEUE) is reported against the rule that needs it. Chains of ours that the
    plan does not use (left by a run in another mode) are removed.
    """
    iptc = _iptc()
    rule_cls = iptc.Rule if family == 4 else iptc.Rule6
    plans = [p for p in _plan(spec, family) if p.table == table_name]
    wanted = {p.chain for p in plans}
    stale = [c for c in _own_chains(table_name, spec.chain_prefix) if c not in wanted]
    built: dict[str, list[Any]] = {}
    for plan in plans:
        built[plan.chain] = []
        for r in plan.rules:
            try:
                built[plan.chain].append(r.build(rule_cls))
            except _iptc_errors() as e:
                text = _rule_text(table_name, plan.chain, r.body, family)
                raise RulesError(f"cannot build rule `{text}`: {_text(e)}") from e

    def ensure_chain(chain: str) -> Callable[[Any], None]:
        def apply(table: Any) -> None:
            if not table.is_chain(chain):
                table.create_chain(chain)

        return apply

    def refill(chain: str) -> Callable[[Any], None]:
        def apply(table: Any) -> None:
            table.flush_entries(chain)  # our own chain only
            for rule in built[chain]:
                iptc.Chain(table, chain).append_rule(rule)

        return apply

    def drop_jumps(table: Any) -> None:
        hook = iptc.Chain(table, HOOK_CHAIN)
        for rule in reversed(_own_jumps(table, [*wanted, *stale])):
            hook.delete_rule(rule)

    def drop_stale(table: Any) -> None:
        for chain in stale:
            if table.is_chain(chain):
                table.flush_entries(chain)
                table.delete_chain(chain)

    ops: list[_Op] = []
    for plan in plans:
        ops.append(_Op(f"-t {table_name} -N {plan.chain}", ensure_chain(plan.chain)))
        body = "; ".join(r.body for r in plan.rules)
        ops.append(_Op(f"-t {table_name} -A {plan.chain} {body}", refill(plan.chain)))
    ops.append(_Op(f"delete jumps to pep's chains from {table_name} {HOOK_CHAIN}", drop_jumps))
    if stale:
        ops.append(_Op(f"-t {table_name} -X {' '.join(stale)}", drop_stale))

    def insert_jump(jump: _Rule) -> Callable[[Any], None]:
        # Built when applied, not up front: python-iptables accepts a chain name as a jump
        # target only once the chain exists in one of its (cached) table handles.
        def apply(table: Any) -> None:
            iptc.Chain(table, HOOK_CHAIN).insert_rule(jump.build(rule_cls))

        return apply

    jumps = [j for plan in plans for j in plan.jumps]
    # Insert at position 0 in reverse so the jumps end up at the top in the planned order.
    ops += [
        _Op(_rule_text(table_name, HOOK_CHAIN, j.body, family), insert_jump(j))
        for j in reversed(jumps)
    ]
    return ops


def _apply(table_name: str, ops: list[_Op], attempted: list[str], family: int = 4) -> None:
    """Apply ``ops`` to one table in a single commit; on refusal, name the op that is refused.

    A batch commit that fails says only "can't commit: <errno text>". To name the culprit the
    ops are replayed one commit at a time (this changes the kernel state op by op; the caller
    rolls back with :func:`remove` after any error). ``table_name`` is appended to ``attempted``
    just before the kernel is first asked to change anything.
    """
    errors = _iptc_errors()
    with _table(table_name, family) as table:
        for op in ops:
            try:
                op.apply(table)
            except errors as e:
                raise RulesError(f"iptables rejected `{op.what}`: {_text(e)}") from e
        attempted.append(table_name)
        try:
            table.commit()
        except errors as e:
            batch_error = e
        else:
            return
    culprit, error = _find_refused(table_name, ops, family)
    if culprit is None:
        raise RulesError(
            f"committing pep's {table_name} rules failed: {_text(batch_error)} "
            f"(rules: {'; '.join(op.what for op in ops)})"
        ) from batch_error
    raise RulesError(f"the kernel refused `{culprit.what}`: {_text(error)}") from batch_error


def _find_refused(
    table_name: str, ops: list[_Op], family: int
) -> tuple[_Op | None, BaseException | None]:
    errors = _iptc_errors()
    try:
        with _table(table_name, family) as table:
            for op in ops:
                try:
                    op.apply(table)
                    table.commit()
                    table.refresh()
                except errors as e:
                    return op, e
    except RulesError:
        pass
    return None, None


# --------------------------------------------------------------------------------------------
# public API


def _in_family_process(fn: Callable[..., Any], *args: Any) -> Any:
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


def install(spec: RuleSpec) -> None:
    """Make the kernel hold exactly pep's rules for ``spec``; idempotent, replaces stale rules.

    Creates our chains if missing, flushes and refills only them, deletes every jump to them
    from ``PREROUTING`` (including jumps for interfaces no longer configured) and inserts the
    wanted jumps at the top; a family not in ``spec`` is cleared of pep's rules. Raises
    :class:`RulesError` on failure; if the kernel was asked to change anything by then, first
    removes whatever pep has in place (the safe state: all traffic routed end to end). A failure
    before that (not root, a missing userspace extension) leaves the rules as they were.
    """
    if not isinstance(spec, RuleSpec):
        raise TypeError(f"install() needs a RuleSpec, got {type(spec).__name__}")
    done = False
    try:
        for family in (4, 6):
            if family in spec.families:
                _in_family_process(_install_family, spec, family)
                done = True
            elif _family_usable(family):  # stale rules of a run with both families
                _in_family_process(_remove_family, spec.chain_prefix, family)
    except RulesError as e:
        if done:
            try:
                remove(spec.chain_prefix)
            except RulesError as rollback:
                e.add_note(f"rollback (remove) also failed: {rollback}")
        raise


def _install_family(spec: RuleSpec, family: int) -> None:
    attempted: list[str] = []
    try:
        for table_name in (MANGLE, NAT):
            _apply(table_name, _install_ops(table_name, spec, family), attempted, family)
    except RulesError as e:
        if not attempted:
            raise
        try:
            _remove_family(spec.chain_prefix, family)
        except RulesError as rollback:
            e.add_note(f"rollback (remove) also failed: {rollback}")
        raise


def remove(chain_prefix: str = "PEP") -> int:
    """Delete pep's jumps from ``PREROUTING``, flush and delete pep's chains, both families.

    Returns the number of rules removed (jumps plus rules inside our chains); 0 and no error when
    nothing is installed. Each table changes in one commit. Best effort across tables: a failure
    in one does not stop the others (the daemon calls this on its way out); the first error is
    raised once all were tried. Chains of every mode are removed, whatever mode installed them.
    """
    _check_prefix(chain_prefix)
    removed = 0
    failures: list[RulesError] = []
    for family in (4, 6):
        if not _family_usable(family):
            continue
        try:
            removed += _in_family_process(_remove_family, chain_prefix, family)
        except RulesError as e:
            failures.append(e)
    if failures:
        for other in failures[1:]:
            failures[0].add_note(str(other))
        raise failures[0]
    return removed


def _remove_family(chain_prefix: str, family: int) -> int:
    removed = 0
    failures: list[RulesError] = []
    for table_name in (MANGLE, NAT):
        try:
            removed += _remove_from(table_name, _own_chains(table_name, chain_prefix), family)
        except RulesError as e:
            failures.append(e)
    if failures:
        for other in failures[1:]:
            failures[0].add_note(str(other))
        raise failures[0]
    return removed


def remove_syn_jumps(chain_prefix: str = "PEP") -> int:
    """Send new connections end to end again, keeping what live split connections still need.

    Deletes only the ``PREROUTING`` jumps to the SYN chain, both families: new SYNs are no
    longer queued, so never marked, so neither redirected nor TPROXY'd. Everything else stays
    until :func:`remove`, after the daemon's drain. In REDIRECT mode the nat REDIRECT rule must
    stay: it holds the namespace's conntrack hooks, and deleting the last NAT target drops them
    (nf_ct_netns_put), so every redirected connection loses its translation and is reset by the
    real server (checked: flushing PEP_REDIRECT killed a live transfer, deleting only the jumps
    did not). In TPROXY mode the divert chain and the policy routes deliver live flows' packets.
    """
    _check_prefix(chain_prefix)
    removed = 0
    for family in (4, 6):
        if _family_usable(family):
            removed += _in_family_process(_remove_syn_jumps, chain_prefix, family)
    return removed


def _remove_syn_jumps(chain_prefix: str, family: int) -> int:
    own = syn_chain(chain_prefix)
    with _table(MANGLE, family) as table:
        try:
            jumps = _own_jumps(table, own)
            hook = _iptc().Chain(table, HOOK_CHAIN)
            for rule in reversed(jumps):
                hook.delete_rule(rule)
            if jumps:
                table.commit()
        except _iptc_errors() as e:
            raise RulesError(
                f"removing the jumps to {own} from {MANGLE} {HOOK_CHAIN} failed: {_text(e)}"
            ) from e
    return len(jumps)


def _family_usable(family: int) -> bool:
    """IPv6 may be disabled in the kernel (ipv6.disable=1): then there is nothing to manage."""
    return family == 4 or os.path.isdir("/proc/sys/net/ipv6")


def _remove_from(table_name: str, owns: list[str], family: int = 4) -> int:
    errors = _iptc_errors()
    iptc = _iptc()
    count = 0
    failing = "|".join(owns)
    with _table(table_name, family) as table:
        what = f"-t {table_name} -D {HOOK_CHAIN} ... -j {'|'.join(owns)}"
        try:
            jumps = _own_jumps(table, owns)
            hook = iptc.Chain(table, HOOK_CHAIN)
            for rule in reversed(jumps):
                hook.delete_rule(rule)
            count = len(jumps)
            existing = [own for own in owns if table.is_chain(own)]
            for own in existing:
                failing = own
                what = f"-t {table_name} -F {own}; -t {table_name} -X {own}"
                count += len(iptc.Chain(table, own).rules)
                table.flush_entries(own)
                table.delete_chain(own)
            if not (jumps or existing):
                return 0
            what = f"commit the removal of {', '.join(owns)} from {table_name}"
            table.commit()
        except errors as e:
            hint = ""
            if "Too many links" in _text(e):
                hint = f" (a chain other than {HOOK_CHAIN} still jumps to {failing}; pep leaves it)"
            raise RulesError(f"removing pep's rules failed at `{what}`: {_text(e)}{hint}") from e
    return count


def show(chain_prefix: str = "PEP", family: int = 4) -> list[str]:
    """pep's installed rules in iptables-save syntax: jumps from ``PREROUTING``, then our chains.

    One line per rule, each starting with ``-t TABLE -A CHAIN`` (``-6 -t ...`` for ip6tables);
    mangle first, then nat. An empty list when nothing is installed.
    """
    _check_prefix(chain_prefix)
    if not _family_usable(family):
        return []
    return _in_family_process(_show_family, chain_prefix, family)


def _show_family(chain_prefix: str, family: int) -> list[str]:
    errors = _iptc_errors()
    iptc = _iptc()
    lines: list[str] = []
    for table_name in (MANGLE, NAT):
        owns = _own_chains(table_name, chain_prefix)
        with _table(table_name, family) as table:
            try:
                for rule in _own_jumps(table, owns):
                    lines.append(_format_rule(table_name, HOOK_CHAIN, rule, family))
                for own in owns:
                    if table.is_chain(own):
                        for rule in iptc.Chain(table, own).rules:
                            lines.append(_format_rule(table_name, own, rule, family))
            except errors as e:
                raise RulesError(f"reading pep's {table_name} rules failed: {_text(e)}") from e
    return lines


# --------------------------------------------------------------------------------------------
# formatting existing rules the way iptables-save does


def _negatable(flag: str, value: str | None) -> list[str]:
    if not value:
        return []
    if value.startswith("!"):
        return ["!", flag, value[1:]]
    return [flag, value]


def _address(value: str | None) -> str | None:
    """python-iptables gives ``10.0.0.0/255.0.0.0``; iptables-save prints ``10.0.0.0/8``."""
    if not value:
        return None
    neg = value.startswith("!")
    net = ipaddress.ip_network(value.lstrip("!"), strict=False)
    if net.prefixlen == 0:
        return None
    return ("!" if neg else "") + net.with_prefixlen


def _quote(value: str) -> str:
    if value and not re.search(r"[\s\"']", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _params(params: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for key, values in params.items():
        if values and values[0] == "!":
            out.append("!")
            values = values[1:]
        out.append(f"--{key}")
        out.extend(_quote(v) for v in values)
    return out


def _format_rule(table: str, chain: str, rule: Any, family: int = 4) -> str:
    parts = (["-6"] if family == 6 else []) + ["-t", table, "-A", chain]
    parts += _negatable("-s", _address(rule.src))
    parts += _negatable("-d", _address(rule.dst))
    parts += _negatable("-i", rule.in_interface)
    parts += _negatable("-o", rule.out_interface)
    protocol = rule.protocol  # python-iptables names protocol 0 "ip"; iptables-save omits it
    if protocol and protocol.lstrip("!") not in ("ip", "all", "0"):
        parts += _negatable("-p", protocol)
    for match in rule.matches:
        parts += ["-m", match.name, *_params(match.get_all_parameters())]
    target = rule.target
    if target is not None and target.name:
        parts += ["-g" if target.goto else "-j", target.name]
        parts += _params(target.get_all_parameters())
    return " ".join(parts)
