"""A status document to test the readers of one (render, metrics, merge) with: what a
daemon with a few connections in every state would report."""

from __future__ import annotations

from pep.capture import nfq_proc
from pep.capture.flows import FlowTable
from pep.capture.syn_queue import SynCounters
from pep.config import Config
from pep.ops.status import document as status
from pep.split.connections import ConnectionTable
from pep.split.relay_state import RelayStats
from pep.split.session import ListenerCounters
from tests.helpers.packets import PROC_TEXT

__all__ = ["Clock", "sample_doc"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sample_doc(worker: int | None = None, cfg: Config | None = None) -> status.Doc:
    """Two live connections (one relaying, one connecting), one closed, one failure."""
    clock = Clock()
    table = ConnectionTable(clock)
    a = table.open(("10.0.0.2", 40000), ("10.9.0.1", 80), "10.9.0.1:80")
    table.established(a, RelayStats(up=100, down=2000), 0.003)
    clock.now += 1
    b = table.open(("10.0.0.3", 40001, 0, 0), ("2001:db8::1", 443), "-")
    done = table.open(("10.0.0.4", 40002), ("10.9.0.1", 80), "10.9.0.1:80")
    table.established(done, RelayStats(up=5, down=7), 0.7)
    table.close(done)
    failed = table.open(("10.0.0.5", 40003), ("10.9.0.9", 81), "-")
    table.close(failed, failure="connect failed: ECONNREFUSED")
    table.close(failed, failure="connect failed: ECONNREFUSED")  # idempotent
    clock.now += 2
    assert b.state == "connecting"
    return status.document(
        cfg=cfg or Config(interfaces=("eth1",)),
        table=table,
        listener=ListenerCounters(accepted=4, split=2, upstream_failed=1, active=1),
        syn=SynCounters(queued=5, split=4, unparsable=1),
        flows=FlowTable(16, 30.0),
        queues=(0, 0),
        kernel_queues=nfq_proc.parse(PROC_TEXT, (0, 0)),
        queue_portids=[31415],
        started=50.0,
        now=clock.now,
        worker=worker,
    )
