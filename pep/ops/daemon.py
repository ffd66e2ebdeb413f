"""``pep run``: wire the SYN reader, the listener and the rules together for the daemon's life.

Start order makes the rules the last thing installed: the listener and the queue are ready
before any SYN can be marked for them. Stop order makes them the first thing removed: new
flows go end to end again while live connections are being closed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterable

import trio

from pep.capture.fdbudget import FdBudget
from pep.capture.flows import FlowTable
from pep.capture.preconnect import PreConnector
from pep.capture.syn_queue import SynQueue
from pep.config import Config
from pep.config.peer import load_key
from pep.kernel import cleanup, iptables_setup, link_routes, tproxy_routes
from pep.link.legs import LinkLegs
from pep.link.slots import SLOTS_ENV, WorkerSlots
from pep.ops import systemd
from pep.ops.reload import set_link_routes
from pep.ops.runtime import Runtime
from pep.peer.pool import PeerPool
from pep.peer.server import PeerListener
from pep.split.listener import Listener
from pep.split.session import Sessions
from pep.split.upstream import open_for
from pep.support.errors import describe

__all__ = ["install_rules", "remove_rules", "rule_spec", "serve", "stop_new_flows"]

log = logging.getLogger(__name__)


def rule_spec(cfg: Config) -> iptables_setup.RuleSpec:
    return iptables_setup.RuleSpec(
        interfaces=cfg.interfaces,
        queues=cfg.queue_range,  # --queue-balance with several queues
        listen_port=cfg.listen_port,
        split_mark=cfg.split_mark,
        mark_mask=cfg.mark_mask,
        mode=cfg.mode,
        families=cfg.families,
        tproxy_mark=cfg.tproxy_mark,
    )


def missing_interfaces(
    interfaces: Iterable[str], present: Iterable[str] | None = None
) -> list[str]:
    """The ingress interfaces this namespace does not have (``present``: default, its own);
    a trailing "+" is iptables' wildcard: "ppp+" is there when some ppp interface is."""
    try:
        have = set(present) if present is not None else {n for _, n in socket.if_nameindex()}
    except OSError:
        return []  # cannot tell: say nothing rather than something wrong
    return [
        i
        for i in interfaces
        if i not in have and not (i.endswith("+") and any(h.startswith(i[:-1]) for h in have))
    ]


def install_rules(cfg: Config) -> None:
    """Everything pep puts into the kernel at start: with [link], the initial windows on the
    link's routes; in TPROXY mode the policy routing; last, the netfilter rules that send
    flows to pep (so the first flow split finds the rest in place).

    An interface that does not exist is a warning, not an error: the rules match it by name,
    so one that comes up later (ppp0 on dial-up) is split from then on; the warning is what
    gives a typo away. (The link's interface must exist: cli.py checks it before this.)

    All or nothing: when a step fails, what the earlier ones installed is removed again (its
    failures are noted on the error), as the caller never removes what it was not told is
    installed.
    """
    for name in missing_interfaces(cfg.interfaces):
        log.warning(
            "interface %s does not exist (yet): its connections are split once it appears", name
        )
    installed: list[tuple[str, Callable[[], int]]] = []  # what to take back on failure
    try:
        set_link_routes(cfg.link)  # a crashed run's changes are put back first
        if cfg.link is not None:
            installed.append(("the link's route metrics", link_routes.remove))
        if cfg.mode == "tproxy":
            tproxy_routes.install(cfg.tproxy_mark, cfg.route_table, cfg.families)
            installed.append(("the policy routes", tproxy_routes.remove))
        else:
            tproxy_routes.remove()  # a previous TPROXY run's, if any
        iptables_setup.install(rule_spec(cfg))  # leaves its own tables clean when it fails
    except (iptables_setup.RulesError, tproxy_routes.RoutingError) as e:
        for name, undo in reversed(installed):
            try:
                undo()
            except tproxy_routes.RoutingError as rollback:
                e.add_note(f"removing {name} again also failed: {describe(rollback)}")
        raise


def remove_rules() -> int:
    """Every rule and route pep installed, whatever mode installed it: each kind of kernel
    state is tried even when another fails (pep.kernel.cleanup); KernelStateError names every
    failure once all were tried."""
    return cleanup.remove()


def stop_new_flows() -> int:
    """New connections go end to end from now on; live ones keep working until remove_rules
    (see iptables_setup.remove_syn_jumps for why the rest must stay through the drain)."""
    return iptables_setup.remove_syn_jumps()


async def serve(
    cfg: Config, reload: Callable[[], Config] | None = None, worker: int | None = None
) -> None:
    """Run until SIGINT/SIGTERM, then drain; rules are removed on every way out, errors included.

    ``reload`` reads the configuration again on SIGHUP (pep.ops.runtime). With ``worker`` set this
    is worker N of a ``workers`` daemon (pep.ops.workers): it reads queue ``queue + N``, shares the
    port, and leaves the rules to the master.
    """
    # Which legs cross the link, their tuning and pacing; a worker shares the link with the
    # other workers through the counts its master handed down (pep.link.pacer.WorkerSlots).
    slots = os.environ.get(SLOTS_ENV) if worker is not None else None
    links = LinkLegs(cfg.link, WorkerSlots.inherit(slots, cfg.workers, worker) if slots else None)
    # strict mode's upstreams (opened as a session opens them): it closes those left unclaimed
    preconnect = PreConnector(functools.partial(open_for, links=links))
    flows = FlowTable(cfg.flow_table_size, cfg.flow_ttl, on_drop=preconnect.discard)
    # [peer]: connections to the far PEP kept ready (near end), and its listener (far end).
    secret = load_key(cfg.peer.key_file) if cfg.peer is not None else b""
    near = cfg.peer is not None and cfg.peer.connect
    pool = PeerPool(cfg.peer, secret, cfg, links.routes.oif, links) if near and cfg.peer else None
    sessions = Sessions(cfg, flows, links, [pool] if pool is not None else [])
    listener = Listener(cfg, sessions)
    far = cfg.peer is not None and cfg.peer.listen
    peer_listener = PeerListener(cfg.peer, secret, cfg, sessions) if far and cfg.peer else None
    mine = cfg.worker_queues(worker)
    queue = SynQueue(
        cfg,
        mine,
        flows,
        load=lambda: sessions.counters.active,
        room=FdBudget().room,  # out of descriptors: bypass
        preconnect=preconnect,
    )
    installed = False
    started = False  # got as far as serving: the summary on the way out is worth a line
    rt = Runtime(
        cfg,
        listener=listener,
        sessions=sessions,
        queue=queue,
        flows=flows,
        queues=(mine[0], mine[-1]),
        worker=worker,
        reload=reload,
        peer_listener=peer_listener,
        pool=pool,
    )
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            listener.bind()
            if peer_listener is not None:
                peer_listener.bind()
            queue.open()
            await rt.services.open()
            if worker is None:
                install_rules(cfg)
                installed = True
            async with trio.open_nursery() as services:  # status, metrics: through the drain
                rt.services.start(services)
                services.start_soon(rt.watch_signals, signals)
                async with trio.open_nursery() as connections:
                    await connections.start(links.run)  # pacing the link legs to the end
                    if pool is not None:
                        await connections.start(pool.run)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(queue.run)
                        nursery.start_soon(listener.serve, connections)
                        if peer_listener is not None:
                            nursery.start_soon(peer_listener.serve, connections)
                        started = True
                        if worker is None:
                            log.info(
                                "ready: splitting TCP from %s via queue %s to port %d",
                                ",".join(cfg.interfaces),
                                "{}-{}".format(*cfg.queue_range),
                                cfg.listen_port,
                            )
                            systemd.notify("READY=1")
                        else:
                            log.info("worker %d: reading queues %s", worker, mine)
                        await rt.stopping.wait()
                        if installed and rt.idle():
                            remove_rules()  # nothing to drain: all at once
                            installed = False
                        else:
                            if installed:
                                stop_new_flows()  # the rest goes after the drain
                            await rt.accept_grace()  # handshakes redirected just before
                        nursery.cancel_scope.cancel()
                    listener.close()  # stop accepting
                    if peer_listener is not None:
                        peer_listener.close()
                    await rt.drain(connections.cancel_scope)
                services.cancel_scope.cancel()
    finally:
        if installed:
            remove_rules()
        queue.close()
        listener.close()
        if peer_listener is not None:
            peer_listener.close()
        flows.clear()  # closes strict mode's unclaimed upstreams (PreConnector.discard)
        rt.services.close()
        if started:  # a start that failed says why (the caller logs it), not what it did
            _summary(queue, listener)


def _summary(queue: SynQueue, listener: Listener) -> None:
    q, lc = queue.counters, listener.counters
    log.info(
        "stopped: syn queued=%d split=%d bypassed=%d admission_bypassed=%d "
        "fd_bypassed=%d unparsable=%d malformed=%d enobufs=%d; connections accepted=%d "
        "split=%d refused=%d refused_no_fd=%d upstream_failed=%d; policy decisions: %s",
        q.queued,
        q.split,
        q.bypassed,
        q.admission_bypassed,
        q.fd_bypassed,
        q.unparsable,
        q.malformed,
        q.enobufs,
        lc.accepted,
        lc.split,
        lc.not_redirected,
        lc.refused_no_fd,
        lc.upstream_failed,
        " ".join(f"{k}={v}" for k, v in queue.decider.policy.hits.items()) or "none",
    )
