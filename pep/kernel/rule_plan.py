"""Which netfilter rules pep wants, as :class:`pep.kernel.nfrule.NfRule` descriptions (pure: no
kernel).

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pep.kernel.nfrule import NfRule, comment, ext

__all__ = [
    "ChainPlan",
    "RuleSpec",
    "check_prefix",
    "comment_tag",
    "divert_chain",
    "expected_rules",
    "own_chains",
    "plan",
    "redirect_chain",
    "syn_chain",
]

MANGLE = "mangle"
NAT = "nat"
HOOK_CHAIN = "PREROUTING"
FULL_MASK = 0xFFFFFFFF  # a 32-bit skb mark; iptables-save prints a mark with it bare

# Chain names are at most 28 characters (XT_EXTENSION_MAXNAMELEN 29 with the NUL,
# include/uapi/linux/netfilter/x_tables.h); the longest suffix is "_REDIRECT" (9), which
# leaves 19 for the prefix.
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,18}$")


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """What to install, from a validated :class:`pep.config.Config` (see pep.ops.daemon.rule_spec).

    The values are not checked again here: pep.config validates every one of them (interface
    names, queue range, port, marks and their overlap, mode, families). Only ``chain_prefix``
    is checked, as no configuration key sets it and it is the API's own argument (it bounds the
    chain names' length). ``queues`` is ``(first, last)``: equal numbers give ``--queue-num
    first``, a range gives ``--queue-balance first:last``. The nat rule matches
    ``--mark split_mark/mark_mask``.
    """

    interfaces: tuple[str, ...]
    queues: tuple[int, int]
    listen_port: int
    split_mark: int
    mark_mask: int
    chain_prefix: str = "PEP"  # the daemon's; a second instance (or a test) picks its own
    # The daemon passes every field below from its Config; these defaults are Config's, but for
    # families, where a bare RuleSpec (tests) manages IPv4 only.
    mode: str = "redirect"  # or "tproxy"
    families: tuple[int, ...] = (4,)  # 4 -> iptables, 6 -> ip6tables
    tproxy_mark: int = 0x10000  # TPROXY mode: mark routed to the local socket

    def __post_init__(self) -> None:
        # Frozen and hashable: a list given by a caller becomes the declared tuple. A string
        # would silently become its letters, one interface each.
        if isinstance(self.interfaces, str):
            raise ValueError(
                f"RuleSpec.interfaces must be a sequence of names, not the string "
                f"{self.interfaces!r}"
            )
        for name in ("interfaces", "queues", "families"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_prefix(self.chain_prefix)


def check_prefix(prefix: str) -> None:
    """Refuse a chain prefix that would make an invalid or too long chain name."""
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


def own_chains(table: str, prefix: str) -> list[str]:
    """Every chain pep may own in ``table``, whatever the mode: removal finds stale ones too.

    In the order ``pep rules show`` lists their content.
    """
    if table == MANGLE:
        return [divert_chain(prefix), syn_chain(prefix)]
    return [redirect_chain(prefix)]


@dataclass(frozen=True, slots=True)
class ChainPlan:
    """One chain of pep's: the jumps to it from PREROUTING and its content, each in order."""

    table: str
    chain: str
    jumps: tuple[NfRule, ...]
    rules: tuple[NfRule, ...]


def _mark(mark: int, mask: int) -> str:
    """``-m mark --mark`` as libxt_mark saves it: the mask only when it is not all ones."""
    return f"{mark:#x}" if mask == FULL_MASK else f"{mark:#x}/{mask:#x}"


def _tproxy_mark(spec: RuleSpec) -> str:
    """The TPROXY and MARK targets' ``MARK/MASK`` (both always save the mask)."""
    return f"{spec.tproxy_mark:#x}/{spec.tproxy_mark:#x}"


def _jump(table: str, iface: str | None, own: str, prefix: str, family: int) -> NfRule:
    return NfRule(
        table,
        HOOK_CHAIN,
        ext(own),
        (comment(comment_tag(prefix)),),
        protocol="tcp",
        in_interface=iface,
        family=family,
    )


def _queue_rule(spec: RuleSpec, family: int) -> NfRule:
    first, last = spec.queues
    queue = {"queue_num": str(first)} if first == last else {"queue_balance": f"{first}:{last}"}
    return NfRule(
        MANGLE,
        syn_chain(spec.chain_prefix),
        ext("NFQUEUE", **queue, queue_bypass=""),
        # Connections to the gateway's own addresses (ssh to the box, or pep's listener port
        # itself) are not forwarded traffic: never queue, mark or redirect them.
        (ext("addrtype", dst_type="!LOCAL"), ext("tcp", tcp_flags=("FIN,SYN,RST,ACK", "SYN"))),
        protocol="tcp",
        family=family,
    )


def _redirect_rule(spec: RuleSpec, family: int) -> NfRule:
    return NfRule(
        NAT,
        redirect_chain(spec.chain_prefix),
        ext("REDIRECT", to_ports=str(spec.listen_port)),
        (ext("mark", mark=_mark(spec.split_mark, spec.mark_mask)),),
        protocol="tcp",
        family=family,
    )


def _tproxy_rule(spec: RuleSpec, family: int) -> NfRule:
    # --on-ip: the wildcard address, which iptables-save prints even when not given.
    # Revision 1 serves both families; python-iptables' default lookup misses it for IPv6.
    target = ext(
        "TPROXY",
        revision=1,
        on_port=str(spec.listen_port),
        on_ip="0.0.0.0" if family == 4 else "::",
        tproxy_mark=_tproxy_mark(spec),
    )
    return NfRule(
        MANGLE,
        syn_chain(spec.chain_prefix),
        target,
        (ext("mark", mark=_mark(spec.split_mark, spec.mark_mask)),),
        protocol="tcp",
        family=family,
    )


def _divert_rules(spec: RuleSpec, family: int) -> tuple[NfRule, NfRule]:
    div = divert_chain(spec.chain_prefix)
    return (
        NfRule(
            MANGLE,
            div,
            ext("MARK", set_xmark=_tproxy_mark(spec)),
            (ext("socket", transparent=""),),
            protocol="tcp",
            family=family,
        ),
        NfRule(
            MANGLE,
            div,
            ext("ACCEPT"),
            (ext("mark", mark=_mark(spec.tproxy_mark, spec.tproxy_mark)),),
            family=family,
        ),
    )


def plan(spec: RuleSpec, family: int) -> list[ChainPlan]:
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
    syn_jumps = tuple(_jump(MANGLE, iface, syn, prefix, family) for iface in spec.interfaces)
    if spec.mode == "redirect":
        red = redirect_chain(prefix)
        return [
            ChainPlan(MANGLE, syn, syn_jumps, (_queue_rule(spec, family),)),
            ChainPlan(
                NAT,
                red,
                tuple(_jump(NAT, iface, red, prefix, family) for iface in spec.interfaces),
                (_redirect_rule(spec, family),),
            ),
        ]
    div = divert_chain(prefix)
    return [
        ChainPlan(
            MANGLE, div, (_jump(MANGLE, None, div, prefix, family),), _divert_rules(spec, family)
        ),
        ChainPlan(MANGLE, syn, syn_jumps, (_tproxy_rule(spec, family), _queue_rule(spec, family))),
    ]


def expected_rules(spec: RuleSpec, family: int = 4) -> list[str]:
    """The lines :func:`pep.kernel.iptables_setup.show` returns once ``spec`` is installed.

    Per table (mangle, then nat): the jumps in PREROUTING, then the content of our chains in
    :func:`own_chains` order, which is how the reader walks the tables.
    """
    plans = plan(spec, family)
    out = []
    for table in (MANGLE, NAT):
        mine = [p for p in plans if p.table == table]
        out += [j.line() for p in mine for j in p.jumps]
        order = own_chains(table, spec.chain_prefix)
        for p in sorted(mine, key=lambda p: order.index(p.chain)):
            out += [r.line() for r in p.rules]
    return out
