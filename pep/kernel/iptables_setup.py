"""Install and remove pep's netfilter rules through python-iptables, each table in one commit.

Which rules, and why they look the way they do: :mod:`pep.kernel.rule_plan` (pure). Reading them
back: :mod:`pep.kernel.rule_show`. This module applies the plan and takes it away again, and is the
public API the daemon, the CLI and the tests use (it re-exports the plan's and the reader's
names).

Each table is changed in one libiptc commit (``autocommit`` off), so an install either replaces the
table's pep rules completely or leaves them as they were. The mangle and nat tables are two commits;
if the second fails, :func:`install` rolls back with :func:`remove` before raising. Every family's
work runs in its own short-lived process (:func:`pep.kernel.rule_show.in_family_process` says why).
python-iptables is not thread-safe: call these functions from the main thread at startup/shutdown
only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pep.kernel.rule_plan import (
    HOOK_CHAIN,
    MANGLE,
    NAT,
    RuleSpec,
    check_prefix,
    expected_rules,
    own_chains,
    plan,
    syn_chain,
)
from pep.kernel.rule_show import (
    RulesError,
    error_text,
    family_usable,
    fresh_table,
    in_family_process,
    iptc_errors,
    iptc_module,
    own_jumps,
    show,
)
from pep.support.errors import describe

__all__ = [
    "RuleSpec",
    "RulesError",
    "expected_rules",
    "install",
    "remove",
    "remove_syn_jumps",
    "show",
]


@dataclass(frozen=True, slots=True)
class _Op:
    """One change to a table: a description for error messages and the code that makes it.

    Every op reads the table state it needs when it runs, so the list can be applied either as
    one batch or op by op with a commit after each (to find which one the kernel refuses).
    """

    what: str
    apply: Callable[[Any], None]


def _install_ops(table_name: str, spec: RuleSpec, family: int = 4) -> list[_Op]:
    """The ops that make ``table_name`` hold exactly pep's rules for ``spec``.

    Every rule is built here, before anything is changed, so a missing userspace extension
    (e.g. libxt_NFQUEUE) is reported against the rule that needs it. Chains of ours that the
    plan does not use (left by a run in another mode) are removed.
    """
    iptc = iptc_module()
    plans = [p for p in plan(spec, family) if p.table == table_name]
    wanted = {p.chain for p in plans}
    stale = [c for c in own_chains(table_name, spec.chain_prefix) if c not in wanted]
    built: dict[str, list[Any]] = {}
    for p in plans:
        built[p.chain] = []
        for r in p.rules:
            try:
                built[p.chain].append(r.build(iptc))
            except iptc_errors() as e:
                raise RulesError(f"cannot build rule `{r.line()}`: {error_text(e)}") from e

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
        for rule in reversed(own_jumps(table, [*wanted, *stale])):
            hook.delete_rule(rule)

    def drop_stale(table: Any) -> None:
        for chain in stale:
            if table.is_chain(chain):
                table.flush_entries(chain)
                table.delete_chain(chain)

    ops: list[_Op] = []
    for p in plans:
        ops.append(_Op(f"-t {table_name} -N {p.chain}", ensure_chain(p.chain)))
        body = "; ".join(r.spec() for r in p.rules)
        ops.append(_Op(f"-t {table_name} -A {p.chain} {body}", refill(p.chain)))
    ops.append(_Op(f"delete jumps to pep's chains from {table_name} {HOOK_CHAIN}", drop_jumps))
    if stale:
        ops.append(_Op(f"-t {table_name} -X {' '.join(stale)}", drop_stale))

    def insert_jump(jump: Any) -> Callable[[Any], None]:
        # Built when applied, not up front: python-iptables accepts a chain name as a jump
        # target only once the chain exists in one of its (cached) table handles.
        def apply(table: Any) -> None:
            iptc.Chain(table, HOOK_CHAIN).insert_rule(jump.build(iptc))

        return apply

    jumps = [j for p in plans for j in p.jumps]
    # Insert at position 0 in reverse so the jumps end up at the top in the planned order.
    ops += [_Op(j.line(), insert_jump(j)) for j in reversed(jumps)]
    return ops


def _apply(table_name: str, ops: list[_Op], attempted: list[str], family: int = 4) -> None:
    """Apply ``ops`` to one table in a single commit; on refusal, name the op that is refused.

    A batch commit that fails says only "can't commit: <errno text>". To name the culprit the
    ops are replayed one commit at a time (this changes the kernel state op by op; the caller
    rolls back with :func:`remove` after any error). ``table_name`` is appended to ``attempted``
    just before the kernel is first asked to change anything.
    """
    errors = iptc_errors()
    with fresh_table(table_name, family) as table:
        for op in ops:
            try:
                op.apply(table)
            except errors as e:
                raise RulesError(f"iptables rejected `{op.what}`: {error_text(e)}") from e
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
            f"committing pep's {table_name} rules failed: {error_text(batch_error)} "
            f"(rules: {'; '.join(op.what for op in ops)})"
        ) from batch_error
    raise RulesError(f"the kernel refused `{culprit.what}`: {error_text(error)}") from batch_error


def _find_refused(
    table_name: str, ops: list[_Op], family: int
) -> tuple[_Op | None, BaseException | None]:
    errors = iptc_errors()
    try:
        with fresh_table(table_name, family) as table:
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
                in_family_process(_install_family, spec, family)
                done = True
            elif family_usable(family):  # stale rules of a run with both families
                in_family_process(_remove_family, spec.chain_prefix, family)
    except RulesError as e:
        if done:
            try:
                remove(spec.chain_prefix)
            except RulesError as rollback:
                e.add_note(f"rollback (remove) also failed: {describe(rollback)}")
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
            e.add_note(f"rollback (remove) also failed: {describe(rollback)}")
        raise


def _each(calls: Iterable[Callable[[], int]]) -> int:
    """Make every call even when one fails (best effort); the sum of their counts.

    The first :class:`RulesError` is raised once all were made, the others added as notes.
    """
    count = 0
    failures: list[RulesError] = []
    for call in calls:
        try:
            count += call()
        except RulesError as e:
            failures.append(e)
    if failures:
        for other in failures[1:]:
            failures[0].add_note(str(other))
        raise failures[0]
    return count


def _families(fn: Callable[[str, int], int], chain_prefix: str) -> int:
    """``fn(chain_prefix, family)`` in each usable family's own process, best effort."""
    check_prefix(chain_prefix)
    return _each(
        partial(in_family_process, fn, chain_prefix, family)
        for family in (4, 6)
        if family_usable(family)
    )


def remove(chain_prefix: str = "PEP") -> int:
    """Delete pep's jumps from ``PREROUTING``, flush and delete pep's chains, both families.

    Returns the number of rules removed (jumps plus rules inside our chains); 0 and no error when
    nothing is installed. Each table changes in one commit. Best effort across tables: a failure
    in one does not stop the others (the daemon calls this on its way out); the first error is
    raised once all were tried. Chains of every mode are removed, whatever mode installed them.
    """
    return _families(_remove_family, chain_prefix)


def _remove_family(chain_prefix: str, family: int) -> int:
    return _each(
        partial(_remove_from, table_name, own_chains(table_name, chain_prefix), family)
        for table_name in (MANGLE, NAT)
    )


def remove_syn_jumps(chain_prefix: str = "PEP") -> int:
    """Send new connections end to end again, keeping what live split connections still need.

    Deletes only the ``PREROUTING`` jumps to the SYN chain, both families (best effort, as
    :func:`remove`): new SYNs are no longer queued, so never marked, so neither redirected nor
    TPROXY'd. Everything else stays until :func:`remove`, after the daemon's drain. In REDIRECT
    mode the nat REDIRECT rule must stay: it holds the namespace's conntrack hooks, and deleting
    the last NAT target drops them (nf_ct_netns_put), so every redirected connection loses its
    translation and is reset by the real server (checked: flushing PEP_REDIRECT killed a live
    transfer, deleting only the jumps did not). In TPROXY mode the divert chain and the policy
    routes deliver live flows' packets.
    """
    return _families(_remove_syn_jumps, chain_prefix)


def _remove_syn_jumps(chain_prefix: str, family: int) -> int:
    own = syn_chain(chain_prefix)
    with fresh_table(MANGLE, family) as table:
        try:
            jumps = own_jumps(table, [own])
            hook = iptc_module().Chain(table, HOOK_CHAIN)
            for rule in reversed(jumps):
                hook.delete_rule(rule)
            if jumps:
                table.commit()
        except iptc_errors() as e:
            raise RulesError(
                f"removing the jumps to {own} from {MANGLE} {HOOK_CHAIN} failed: {error_text(e)}"
            ) from e
    return len(jumps)


def _remove_from(table_name: str, owns: list[str], family: int = 4) -> int:
    errors = iptc_errors()
    iptc = iptc_module()
    count = 0
    failing = "|".join(owns)
    with fresh_table(table_name, family) as table:
        what = f"-t {table_name} -D {HOOK_CHAIN} ... -j {'|'.join(owns)}"
        try:
            jumps = own_jumps(table, owns)
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
            if "Too many links" in error_text(e):
                hint = f" (a chain other than {HOOK_CHAIN} still jumps to {failing}; pep leaves it)"
            raise RulesError(
                f"removing pep's rules failed at `{what}`: {error_text(e)}{hint}"
            ) from e
    return count
