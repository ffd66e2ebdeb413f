"""The lab link's netfilter rules: per direction, random loss, then the delay line's NFQUEUE.

python-iptables, written by the delay line's process (pep.lab.delayline), which is alone in
the link namespace: it binds its queues, then installs these, and removes them on its way out.
Described as :class:`pep.kernel.nfrule.NfRule` values, like pep's own rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pep.kernel.nfrule import NfRule, comment, ext
from pep.kernel.rule_show import fresh_table

__all__ = ["LinkRules"]

FILTER = "filter"
CHAIN = "LAB_LINK"
COMMENT = "pep-lab"


@dataclass(frozen=True, slots=True)
class LinkRules:
    """``FORWARD -j LAB_LINK``; in LAB_LINK per direction: random DROP (loss), then NFQUEUE.

    Dropping before queueing keeps lost packets out of the delay line. Only this process
    writes the link namespace's rules, so the chain is ours; still, removal touches only it.
    The rules are described once (:meth:`rules`); the log's lines and the python-iptables
    objects are both rendered from that.
    """

    directions: tuple[tuple[str, int, bool], ...]  # (ingress interface, queue, delayed?)
    loss: float

    def rules(self) -> list[NfRule]:
        """The jump from FORWARD, then LAB_LINK's content in order."""
        out = [NfRule(FILTER, "FORWARD", ext(CHAIN), (comment(COMMENT),))]
        for ifname, queue, delayed in self.directions:
            if self.loss > 0:
                random = ext("statistic", mode="random", probability=_probability(self.loss))
                out.append(NfRule(FILTER, CHAIN, ext("DROP"), (random,), in_interface=ifname))
            if delayed:
                queued = ext("NFQUEUE", queue_num=str(queue))
                out.append(NfRule(FILTER, CHAIN, queued, in_interface=ifname))
        return out

    def lines(self) -> list[str]:
        """The rules as ``iptables-legacy -S`` prints them once installed (for the log)."""
        return [rule.save_line() for rule in self.rules()]

    def install(self) -> None:
        import iptc

        jump, *content = self.rules()
        with fresh_table(FILTER) as table:
            if not table.is_chain(CHAIN):
                table.create_chain(CHAIN)
            table.flush_entries(CHAIN)
            chain = iptc.Chain(table, CHAIN)
            for rule in content:
                chain.append_rule(rule.build(iptc))
            _drop_jumps(iptc.Chain(table, "FORWARD"))
            iptc.Chain(table, "FORWARD").insert_rule(jump.build(iptc))  # CHAIN exists by now
            table.commit()

    @staticmethod
    def remove() -> None:
        import iptc

        with fresh_table(FILTER) as table:
            _drop_jumps(iptc.Chain(table, "FORWARD"))
            if table.is_chain(CHAIN):
                table.flush_entries(CHAIN)
                table.delete_chain(CHAIN)
            table.commit()


# xt_statistic keeps a random probability as a fraction of 2**31 (libxt_statistic.c parses it
# with lround(p * 0x80000000) and saves it with "%.11f").
STATISTIC_SCALE = 0x80000000


def _probability(loss: float) -> str:
    """``--probability`` as iptables-save prints it (0.005 is saved as 0.00499999989)."""
    return f"{math.floor(loss * STATISTIC_SCALE + 0.5) / STATISTIC_SCALE:.11f}"


def _drop_jumps(forward: Any) -> None:
    for rule in [r for r in forward.rules if r.target and r.target.name == CHAIN]:
        forward.delete_rule(rule)
