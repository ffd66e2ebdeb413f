"""Sharing a hub's carrier among its terminals, then each terminal's part among its flows
(sans-IO; pep.link.fairshare.ShareTable calls it when [link] has terminal plans).

A hub sends to many terminals through one carrier, and each terminal's plan is a queue at the
hub's modem that drains at the plan's rate. One max-min share over all flows ignores that: six
flows to one terminal and one to another get six sevenths and one seventh of the carrier, the
first terminal's plan queue overflows and the second gets a seventh of what it pays for
(measured: docs/DESIGN.md, "A hub serves a star of terminals"). So the shares are hierarchical:

1. the carrier is shared among the terminals that have active flows, weighted by their plans
   and never above a plan (weighted max-min, ``weighted_fill``): a terminal whose flows want
   less than its weighted share is given what they want (with the usual headroom, applied to
   each flow's demand before it gets here), and the rest goes to the others;
2. what the terminals leave goes to the flows of addresses in no terminal, max-min among them,
   as all flows were shared before plans existed;
3. what is still left is spread over the terminals below their plans (weighted, up to the
   plan), so a flow that speeds up is not held back for a tick: the caps add up to the carrier
   whenever the plans allow it;
4. each terminal's part is shared max-min among its flows (pep.link.fairshare.fair_shares).

The cost is O(F log F) for F active flows whatever the number of configured terminals: only
terminals with active flows take part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pep.link.fairshare import HEADROOM, ShareTable, _changed, fair_shares

__all__ = ["PlanShareTable", "hierarchical_shares", "weighted_fill"]


def weighted_fill(
    capacity: float, weights: Sequence[float], limits: Sequence[float]
) -> list[float]:
    """Weighted max-min (water-filling): each ``i`` gets ``weights[i] * level`` but at most
    ``limits[i]``, with the level such that the whole ``capacity`` is given (or every one is
    at its limit). Taking them in order of limit per weight, a capped one's rest raises the
    level for those after it."""
    n = len(weights)
    alloc = [0.0] * n
    left, total = max(0.0, capacity), float(sum(weights))
    ratios = [lim / w if w > 0 else 0.0 for lim, w in zip(limits, weights, strict=True)]
    for i in sorted(range(n), key=ratios.__getitem__):
        if total <= 0:
            break
        alloc[i] = min(limits[i], left * weights[i] / total)
        left -= alloc[i]
        total -= weights[i]
    return alloc


def hierarchical_shares(
    capacity: float,
    terminals: Sequence[str | None],
    demands: Sequence[float | None],
    plans: Mapping[str, float],
    floor: float = 0.0,
) -> list[float]:
    """Each flow's cap (payload bytes/s): flow ``i`` belongs to ``terminals[i]`` (None: to no
    terminal, or to one no longer in ``plans``) and wants ``demands[i]`` (None: all it can
    get). ``plans``: each terminal's cap, which is also its weight. No cap is below ``floor``
    (which may, with many flows on a small plan, put a terminal above its plan: the floor keeps
    each flow's ACK clock alive)."""
    groups: dict[str, list[int]] = {}
    others: list[int] = []
    for i, name in enumerate(terminals):
        if name is not None and name in plans:
            members = groups.get(name)
            if members is None:
                groups[name] = [i]
            else:
                members.append(i)
        else:
            others.append(i)
    names = list(groups)
    plan = [plans[name] for name in names]
    wants = [_wants(cap, groups[name], demands) for name, cap in zip(names, plan, strict=True)]
    part = weighted_fill(capacity, plan, wants)  # 1.
    left = capacity - sum(part)
    tiny = capacity * 1e-9  # rounding, not capacity left over
    out = [0.0] * len(demands)
    if others:  # 2.
        theirs = [demands[i] for i in others]
        wanted = sum(d for d in theirs if d is not None) if None not in theirs else left
        given = min(left, wanted)
        left -= given
        rest = [p - w for p, w in zip(plan, part, strict=True)]
        extra = weighted_fill(left, plan, rest) if left > tiny else [0.0] * len(part)  # 3.
        part = [p + e for p, e in zip(part, extra, strict=True)]
        left -= sum(extra)
        for i, cap in zip(others, fair_shares(given + max(0.0, left), theirs, floor), strict=True):
            out[i] = cap
    elif left > tiny:
        rest = [p - w for p, w in zip(plan, part, strict=True)]
        part = [p + e for p, e in zip(part, weighted_fill(left, plan, rest), strict=True)]  # 3.
    for name, share in zip(names, part, strict=True):  # 4.
        members = groups[name]
        if len(members) == 1:  # most terminals have one flow: fair_shares' answer, at once
            out[members[0]] = max(floor, share)
            continue
        mine = [demands[i] for i in members]
        for i, cap in zip(members, fair_shares(share, mine, floor), strict=True):
            out[i] = cap
    return out


def _wants(cap: float, members: list[int], demands: Sequence[float | None]) -> float:
    """What a terminal's flows want together, at most its plan (None: all they can get)."""
    total = 0.0
    for i in members:
        d = demands[i]
        if d is None:
            return cap
        total += d
    return min(cap, total)


class PlanShareTable(ShareTable):
    """pep.link.fairshare.ShareTable with terminal plans: a flow registered with its terminal
    is shared hierarchically (``hierarchical_shares``); with no plans, exactly as before."""

    def __init__(
        self, capacity: float, floor: float = 0.0, plans: Mapping[str, float] | None = None
    ) -> None:
        super().__init__(capacity, floor)
        self.plans: Mapping[str, float] = plans or {}
        # Since the last reshare: whether a demand moved (a flow below its share is measured
        # every tick; one that wants all it can get stays at "all"), and the capacity it had.
        self._moved = True
        self._shared_capacity = capacity

    def add(self, fid: int, terminal: str | None = None) -> float:
        """As ShareTable.add; a terminal's flow starts at most at its plan."""
        cap = super().add(fid)
        flow = self.flows[fid]
        flow.terminal = terminal
        if terminal in self.plans:
            flow.cap = cap = min(cap, max(self.floor, self.plans[terminal]))  # type: ignore[index]
        return cap

    def wake(self, fid: int) -> float | None:
        """As ShareTable.wake, but a terminal's flow is given its share without resharing
        everyone (one pass over the active flows instead of the whole computation: a busy
        hub wakes legs all the time): the terminal's weighted part of the carrier among the
        active terminals, at most its plan, split equally among its active flows. That is
        the exact share when they all want more; when some want less it is below it, and the
        reshare moments later (pep.link.pacer.COALESCE) raises it."""
        flow = self.flows[fid]
        plan = self.plans.get(flow.terminal) if flow.terminal is not None else None
        if plan is None:
            return super().wake(fid)
        flow.active, flow.backlogged = True, True
        self.active[fid] = flow
        self.dirty = True
        mine, weights = 0, {}
        for other in self.active.values():
            name = other.terminal
            if name == flow.terminal:
                mine += 1
            elif name is not None and name in self.plans:
                weights[name] = self.plans[name]
        part = min(plan, self.capacity * plan / (plan + sum(weights.values())))
        cap = max(self.floor, part / mine)
        if _changed(flow.cap, cap):
            flow.cap = cap
            return cap
        return None

    def sample(self, fid: int, sent: int, written: int, waiting: int, dt: float) -> None:
        flow = self.flows[fid]
        was = flow.backlogged
        super().sample(fid, sent, written, waiting, dt)
        if not (was and flow.backlogged):  # a measured rate, or "all" it was or is not now
            self._moved = True

    def reshare(self) -> dict[int, float]:
        """As ShareTable.reshare, but with plans nothing is computed when nothing moved since
        the last one: the same flows, each still wanting all it can get, the same capacity.
        At a busy hub that is most ticks, and the whole computation (1.5 ms at 1,000 legs over
        1,000 terminals, docs/BENCHMARKS.md) would give the same caps."""
        if (
            self.plans
            and not (self.dirty or self._moved)
            and self.capacity == self._shared_capacity
        ):
            return {}
        self._moved, self._shared_capacity = False, self.capacity
        return super().reshare()

    def replan(self, plans: Mapping[str, float]) -> None:
        """Reloaded plans (each flow's terminal is set again by the caller): the next reshare
        applies them."""
        self.plans = plans
        self.dirty = True

    def _shares(self) -> dict[int, float]:
        if not self.plans:
            return super()._shares()
        active = list(self.active.values())
        demands = [None if f.backlogged else f.rate * HEADROOM for f in active]
        caps = hierarchical_shares(
            self.capacity, [f.terminal for f in active], demands, self.plans, self.floor
        )
        return {f.fid: cap for f, cap in zip(active, caps, strict=True)}
