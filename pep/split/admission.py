"""Whether an accepted client is served, and what its SYN record says: the session's decisions,
as pure functions of what the kernel and the SYN reader reported (the session does the IO).

Two refusals, both answered with an RST and counted (pep status, "listener"):

- ``not_redirected``: the client came to the listener itself, not through pep's rules (its
  original destination is the listener): pep is never an open proxy;
- ``refused_local``: the loop guard. The queue rule never marks SYNs for the gateway's own
  addresses, so only a foreign mark (another tool's rule, a misconfiguration) gets here; pep
  must not become a relay into the gateway's own services, nor connect to itself.

Then the flow record: none (``flow_missing``: evicted, expired, or read by another worker,
pep.ops.workers), or one whose destination disagrees with the kernel's (``flow_mismatch``: the
kernel wins, it is what was applied).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["Refusal", "flow_check", "refusal"]

Addr = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Refusal:
    counter: str  # the ListenerCounters field it counts in
    level: int  # how loudly it is logged
    reason: str  # the log line's end


NOT_REDIRECTED = Refusal(
    "not_redirected", logging.INFO, "not redirected (pep is not an open proxy)"
)
LOOP_GUARD = Refusal(
    "refused_local", logging.WARNING, "the destination is this gateway (loop guard)"
)


def refusal(dst: Addr | None, dst_is_local: bool) -> Refusal | None:
    """Why a client whose original destination is ``dst`` is refused, or None: it is served.
    ``dst`` None: it had none (came to the listener directly); ``dst_is_local``: ``dst`` is one
    of this gateway's own addresses."""
    if dst is None:
        return NOT_REDIRECTED
    if dst_is_local:
        return LOOP_GUARD
    return None


def flow_check(recorded: Addr | None, dst: Addr) -> str | None:
    """What the SYN reader's record (its destination, None without one) says against the
    kernel's ``dst``: the counter to count it in, or None when they agree."""
    if recorded is None:
        return "flow_missing"
    if recorded != dst:
        return "flow_mismatch"
    return None
