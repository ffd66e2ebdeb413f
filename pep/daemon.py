"""``pep run``: wire the SYN reader, the listener and the rules together for the daemon's life.

Start order makes the rules the last thing installed: the listener and the queue are ready
before any SYN can be marked for them. Stop order makes them the first thing removed: new
flows go end to end again while live connections are being closed.
"""

from __future__ import annotations

import logging
import signal

import trio

from pep import iptables_setup
from pep.config import Config
from pep.flows import FlowTable
from pep.listener import Listener
from pep.syn_queue import SynQueue

__all__ = ["rule_spec", "serve"]

log = logging.getLogger(__name__)


def rule_spec(cfg: Config) -> iptables_setup.RuleSpec:
    return iptables_setup.RuleSpec(
        interfaces=cfg.interfaces,
        queues=(cfg.queue, cfg.queue),
        listen_port=cfg.listen_port,
        split_mark=cfg.split_mark,
        mark_mask=cfg.mark_mask,
    )


async def serve(cfg: Config) -> None:
    """Run until SIGINT/SIGTERM; rules are removed on every way out, errors included."""
    flows = FlowTable(cfg.flow_table_size, cfg.flow_ttl)
    listener = Listener(cfg, flows)
    queue: SynQueue | None = None
    installed = False
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await listener.bind()
            queue = SynQueue(cfg, cfg.queue, flows)
            queue.open()
            iptables_setup.install(rule_spec(cfg))
            installed = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(queue.run)
                nursery.start_soon(listener.serve, nursery)
                log.info(
                    "ready: splitting TCP from %s via queue %d to port %d",
                    ",".join(cfg.interfaces),
                    cfg.queue,
                    cfg.listen_port,
                )
                async for signum in signals:
                    log.info("%s: removing rules and stopping", signal.Signals(signum).name)
                    break
                iptables_setup.remove()
                installed = False
                nursery.cancel_scope.cancel()
    finally:
        if installed:
            iptables_setup.remove()
        if queue is not None:
            queue.close()
        listener.sock.close()
        if queue is not None:
            q, lc = queue.counters, listener.counters
            log.info(
                "stopped: syn queued=%d split=%d unparsable=%d malformed=%d enobufs=%d; "
                "connections accepted=%d split=%d refused=%d upstream_failed=%d",
                q.queued,
                q.split,
                q.unparsable,
                q.malformed,
                q.enobufs,
                lc.accepted,
                lc.split,
                lc.not_redirected,
                lc.upstream_failed,
            )
