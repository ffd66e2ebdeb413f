"""Strict mode's upstream connections (``syn_verdict = "after-upstream"``), open to close.

In strict mode the SYN reader holds a client's SYN until pep's own connect to its destination
succeeds (pep.capture.syn_queue), so a server that refuses or does not answer is seen by the client
as it is, unsplit. ``PreConnector.connect`` opens that connection; the socket is parked with
the flow in the flow table (``Flow.upstream``) and the session that claims the flow adopts it
(pep.split.session). One that no session claims comes back here: the flow table hands every flow
it drops unclaimed (expired, evicted, replaced by a new SYN, or cleared as the daemon stops)
to ``discard``, which closes it. So one object opens these sockets and closes the unclaimed.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from pep.capture.flows import Flow
from pep.capture.syn import SynInfo
from pep.config import Config

__all__ = ["Opener", "PreConnector", "UpstreamError"]


class UpstreamError(Exception):
    """The original destination could not be reached; ``reason`` is a short label for logs.

    Raised by every upstream connect (pep.split.upstream, the far end through pep.peer.pool)
    and declared here, below them, because strict mode's SYN reader is the first to catch it.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# The connect: ``opener(cfg, dst, client, syn, timeout=...)``, pep.split.upstream.open_for as
# the daemon wires it; raises UpstreamError.
Opener = Callable[..., Awaitable[socket.socket]]


class PreConnector:
    """``opener`` is the connect (pep.split.upstream.open_for, wired by the daemon), given as
    the flow table gets its clock, so the strict-mode bookkeeping is testable without a
    network and the SYN reader does not depend on the connection path above it."""

    def __init__(self, opener: Opener) -> None:
        self._open = opener

    async def connect(self, cfg: Config, syn: SynInfo) -> socket.socket:
        """The upstream connection for ``syn``'s flow, as the session would open it (tuning,
        transparent source, mirrored SYN options), bounded by ``syn_hold_timeout``; raises
        UpstreamError when the destination refuses or does not answer."""
        return await self._open(
            cfg, (syn.dst, syn.dport), (syn.src, syn.sport), syn, timeout=cfg.syn_hold_timeout
        )

    def discard(self, flow: Flow) -> None:
        """The flow table's ``on_drop``: close the flow's parked upstream, if it has one."""
        if flow.upstream is not None:
            flow.upstream.close()
