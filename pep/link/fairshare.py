"""Sharing the link's send rate among the flows sending into it (sans-IO; pep.link.pacer is the
IO shell that owns the sockets, reads tcp_info and sets SO_MAX_PACING_RATE).

Without this, every split flow on the link leg acts as if the link were its own: six parallel
downloads each start with a one-BDP window and BBR's start-up pacing, push ~300 Mbit/s into a
20 Mbit/s link and lose thousands of packets (docs/DESIGN.md). With it, every flow's pacing
cap is its share of the link, so together they never send faster than the link takes them and
the modem queue stays empty: a small request never waits behind a bulk download.

The shares are max-min fair (water-filling): a flow that sends less than an equal share (its
source is slower, it is interactive) is capped just above what it uses, and what it leaves is
divided among the rest. A flow that has data waiting in its socket (``backlogged``) wants as
much as it can get. The caps of the active flows always add up to the capacity.

States: a registered flow is *idle* until pep is about to write into its socket (``wake``);
then it is *active* and gets a share at once, before its first byte is written. A tick in which
it sent nothing and has nothing waiting makes it idle again, and its share goes back to the
others at the next reshare; ``remove`` (the connection closed) gives it back at once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FlowShare", "ShareTable", "fair_shares"]

# A flow sending below its share is capped at this much above its measured rate, so it can
# speed up by half within one tick before it counts as backlogged and gets a full share.
HEADROOM = 1.5
# Caps are re-set only when they change by more than this fraction: a setsockopt per flow per
# tick buys nothing when the shares hold still.
TOLERANCE = 0.02


def fair_shares(capacity: float, demands: list[float | None], floor: float = 0.0) -> list[float]:
    """Max-min fair allocation of ``capacity`` (water-filling); ``None`` = wants all it can
    get. What no flow wants (every demand below its share) is spread equally over all, so the
    caps add up to ``capacity`` and a flow that speeds up is not held back for a tick. No
    share is below ``floor``."""
    n = len(demands)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (demands[i] is None, demands[i] or 0.0))
    alloc = [0.0] * n
    left = capacity
    for k, i in enumerate(order):
        fair = left / (n - k)
        d = demands[i]
        alloc[i] = fair if d is None else min(d, fair)
        left -= alloc[i]
    if left > 1e-9:
        alloc = [a + left / n for a in alloc]
    return [max(floor, a) for a in alloc]


@dataclass(slots=True)
class FlowShare:
    """One link-leg socket's state in the table."""

    fid: int
    active: bool = False
    cap: float = 0.0  # the pacing cap last applied (payload bytes/s)
    backlogged: bool = True  # until measured, a waking flow wants a full share
    rate: float = 0.0  # payload bytes/s sent during the last tick
    sent: int = 0  # bytes sent, as of the last sample
    written: int = 0  # bytes pep had written into the socket, as of the last sample
    terminal: str | None = None  # the terminal it sends to ([link] plans; pep.link.terminalshare)


class ShareTable:
    """The flows on the link leg and their caps. Every method returns the caps to apply:
    ``{fid: bytes/s}``, only those that changed beyond ``TOLERANCE``."""

    def __init__(self, capacity: float, floor: float = 0.0) -> None:
        self.capacity = capacity
        self.floor = floor
        self.flows: dict[int, FlowShare] = {}
        # The active ones, kept apart: a gateway may hold thousands of idle connections, and
        # waking one must not walk them all.
        self.active: dict[int, FlowShare] = {}
        self.dirty = False  # the active set changed since the last reshare

    def add(self, fid: int) -> float:
        """Register an idle flow; returns the cap to give its socket now (an equal share as if
        it were active), so even bytes sent before its first ``wake`` (a Fast Open SYN's) are
        paced."""
        flow = FlowShare(fid)
        self.flows[fid] = flow
        flow.cap = self._equal(len(self.active) + 1)
        return flow.cap

    def remove(self, fid: int) -> None:
        self.flows.pop(fid, None)
        if self.active.pop(fid, None) is not None:
            self.dirty = True

    def wake(self, fid: int) -> float | None:
        """pep is about to write into an idle flow's socket: it is active from now on, with
        its max-min share at once, as a backlogged flow among the others as last sampled (the
        others' caps follow at the next reshare, moments later). Returns the cap to apply, or
        None when it is unchanged."""
        flow = self.flows[fid]
        flow.active, flow.backlogged = True, True
        self.active[fid] = flow
        self.dirty = True
        cap = self._shares()[fid]
        if _changed(flow.cap, cap):
            flow.cap = cap
            return cap
        return None

    def sample(self, fid: int, sent: int, written: int, waiting: int, dt: float) -> None:
        """One tick's reading of an active flow: ``sent`` bytes sent by TCP so far, ``written``
        bytes pep wrote into the socket so far, ``waiting`` bytes in it not yet sent. A flow
        with nothing waiting that pep gave nothing more to send since the last tick is idle:
        what it sent is in flight, which pacing no longer governs (a response's last bytes
        went out during the tick: its share is free from now on, not a tick later)."""
        flow = self.flows[fid]
        delta, fed = sent - flow.sent, written - flow.written
        flow.sent, flow.written = sent, written
        flow.rate = delta / dt if dt > 0 else 0.0
        flow.backlogged = waiting > 0
        if flow.active and fed <= 0 and waiting == 0:
            flow.active = False
            del self.active[fid]
            self.dirty = True

    def reshare(self) -> dict[int, float]:
        """Water-fill the capacity over the active flows; returns the caps that changed."""
        self.dirty = False
        changes = {}
        for fid, cap in self._shares().items():
            flow = self.active[fid]
            if _changed(flow.cap, cap):
                flow.cap = cap
                changes[fid] = cap
        return changes

    def _shares(self) -> dict[int, float]:
        active = list(self.active.values())
        demands = [None if f.backlogged else f.rate * HEADROOM for f in active]
        caps = fair_shares(self.capacity, demands, self.floor)
        return {f.fid: cap for f, cap in zip(active, caps, strict=True)}

    def resize(self, capacity: float, floor: float) -> None:
        """A reloaded [link]: new capacity, applied by the next reshare."""
        self.capacity, self.floor = capacity, floor
        self.dirty = True

    def _equal(self, n: int) -> float:
        return max(self.floor, self.capacity / max(1, n))


def _changed(old: float, new: float) -> bool:
    return old <= 0 or abs(new - old) > TOLERANCE * old
