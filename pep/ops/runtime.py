"""Running the daemon for real: signals, reload, drain, and the state status/metrics read.

- SIGTERM/SIGINT: ``stopping`` is set; ``daemon.serve`` removes the rules (new flows go end to
  end), stops accepting, then ``drain`` lets live connections finish for up to
  ``drain_timeout`` before resetting the rest. A second SIGINT (Ctrl-C twice) resets them now;
  more SIGTERMs are ignored, because systemd and a ``workers`` master may both send one.
- SIGHUP: the config is read again and validated as a whole; an invalid file is rejected with a
  logged error and the running configuration stays. What a reload may change, and what stays
  until a restart: pep.ops.reload. The status socket and metrics endpoint, and the signal
  watcher shared with the workers' master: pep.ops.services.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import trio

from pep.capture.flows import FlowTable
from pep.config import Config, log_level_number
from pep.ops.reload import read_reload, reroute, retune_listener
from pep.ops.services import Services, watch_signals
from pep.ops.status import document as status
from pep.ops.status import socket as status_socket
from pep.split.listener import listener_tuning

if TYPE_CHECKING:  # the data path's parts; the workers' master imports this module without them
    from pep.capture.syn_queue import SynQueue
    from pep.peer.pool import PeerPool
    from pep.peer.server import PeerListener
    from pep.split.listener import Listener
    from pep.split.session import Sessions

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


def _portids(queue: SynQueue) -> list[int]:
    """The netlink port ids of the SYN reader's queue sockets (the proc file's portid)."""
    out = []
    for s in queue.sockets:
        with contextlib.suppress(OSError):  # closed: the daemon is stopping
            out.append(s.sock.getsockname()[0])
    return out


# Bounds of the accept grace after the rules are removed (see Runtime.accept_grace).
ACCEPT_GRACE_MIN = 0.05
ACCEPT_GRACE_MAX = 3.0
_SYN_RECV = "03"  # TCP_SYN_RECV in /proc/net/tcp's "st" column (include/net/tcp_states.h)


def count_syn_recv(text: str, port: int) -> int:
    """Half-open connections to local ``port`` in /proc/net/tcp or tcp6 text."""
    n = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _SYN_RECV and fields[1].endswith(f":{port:04X}"):
            n += 1
    return n


def pending_handshakes(port: int) -> int:
    """Handshakes in progress to ``port`` in this network namespace (the files are 0444)."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                n += count_syn_recv(f.read(), port)
        except OSError:
            pass
    return n


class Runtime:
    """What one daemon process shares between its tasks: the running config, its parts, its
    state. ``daemon.serve`` owns it; status, metrics, the signal watcher and drain read it."""

    def __init__(
        self,
        cfg: Config,
        *,
        listener: Listener,
        sessions: Sessions,
        queue: SynQueue,
        flows: FlowTable,
        queues: tuple[int, int],
        worker: int | None = None,
        reload: Callable[[], Config] | None = None,
        peer_listener: PeerListener | None = None,
        pool: PeerPool | None = None,
    ) -> None:
        self.cfg = cfg
        self.listener = listener
        self.peer_listener = peer_listener
        self.pool = pool
        self.sessions = sessions
        self.queue = queue
        self.flows = flows
        self.queues = queues
        self.worker = worker
        self._reload = reload
        self.state = "running"
        self.started = time.monotonic()
        self.reloads: dict[str, Any] = {"ok": 0, "failed": 0, "last_error": None}
        self.stopping = trio.Event()
        self.force = trio.Event()
        path = cfg.status_socket
        if path and worker is not None:
            path = status_socket.worker_socket(path, worker)
        # A worker serves no metrics: its master serves the sum over all workers.
        listen = cfg.metrics_listen if worker is None else ""
        self.services = Services(path, listen, self.get_document)

    # --- status and metrics

    def document(self) -> status.Doc:
        kernel, error = status.read_kernel_queues(self.queues)
        return status.document(
            cfg=self.cfg,
            table=self.sessions.table,
            listener=self.sessions.counters,
            syn=self.queue.counters,
            flows=self.flows,
            queues=self.queues,
            kernel_queues=kernel,
            kernel_queues_error=error,
            queue_portids=_portids(self.queue),
            state=self.state,
            started=self.started,
            worker=self.worker,
            reloads=self.reloads,
            link=self.sessions.links.snapshot(),
            peer=self.peer_snapshot(),
        )

    def peer_snapshot(self) -> dict[str, object] | None:
        """[peer]'s part of pep status: the pool (near end), the listener (far end)."""
        pool, far = self.pool, self.peer_listener
        if pool is None and far is None:
            return None
        return {
            "pool": pool.snapshot() if pool is not None else None,
            "listener": far.snapshot() if far is not None else None,
        }

    async def get_document(self) -> status.Doc:
        return self.document()

    # --- signals

    async def watch_signals(self, signals: AsyncIterator[int]) -> None:
        await watch_signals(
            signals,
            reload=self.reload,
            stopping=self.stopping,
            force=self.force.set,
            stop_text="new connections go end to end, live ones get up to "
            f"{self.cfg.drain_timeout:.0f} s (drain_timeout)",
            force_text="resetting the remaining connections now",
        )

    # --- reload

    def reload(self) -> bool:
        """Re-read the config; apply it, or keep the running one if it is invalid."""
        plan = read_reload(self._reload, self.cfg, self.reloads, log)
        if plan is None:
            return False
        self.apply(plan.config)
        if plan.kept:
            log.warning(
                "SIGHUP: %s changed but only take effect on restart; running values kept",
                ", ".join(plan.kept),
            )
        log.info(
            "SIGHUP: reloaded (%s)",
            "changed: " + ", ".join(plan.changed) if plan.changed else "no changes",
        )
        return True

    def apply(self, cfg: Config) -> None:
        """Make ``cfg`` the running config (it differs from the old one in RELOADABLE keys)."""
        self.cfg = cfg
        self.sessions.cfg = cfg  # read per connection: timeouts, pipe size, upstream leg
        if self.pool is not None:
            self.pool.cfg = cfg  # read per flow: connect_timeout, transparent_source
        self.queue.cfg = cfg
        self.flows.ttl = cfg.flow_ttl
        self.flows.max_size = cfg.flow_table_size
        for sock in self.listener.socks:
            retune_listener(sock, listener_tuning(cfg))
        self.sessions.links.configure(cfg.link)  # new flows' legs; live ones re-shared
        if self.worker is None:  # the routes: the kernel state's owner's (workers: the master)
            reroute(cfg.link, log)
        logging.getLogger().setLevel(log_level_number(cfg.log_level))

    # --- stopping

    def idle(self) -> bool:
        """No live connection and no handshake in progress: nothing a full rule removal
        (conntrack hooks included) could break."""
        return not len(self.sessions.table) and not pending_handshakes(self.cfg.listen_port)

    async def accept_grace(self) -> None:
        """After the rules are removed, keep accepting while handshakes redirected just
        before are still completing (a client-side round trip: 600 ms when the clients of a
        far-end PEP sit behind a GEO hop), so they are relayed rather than reset."""
        with trio.move_on_after(min(ACCEPT_GRACE_MAX, self.cfg.drain_timeout)):
            await trio.sleep(ACCEPT_GRACE_MIN)  # SYNs still waiting for their verdict
            while pending_handshakes(self.cfg.listen_port):
                await trio.sleep(0.05)

    async def drain(self, connections: trio.CancelScope) -> None:
        """Wait for live connections to finish, up to drain_timeout (or a second SIGINT),
        then cancel the rest: the relay resets both sides of each."""
        self.state = "draining"
        table = self.sessions.table
        if len(table):
            log.info("draining %d live connection(s)", len(table))
        with trio.move_on_after(self.cfg.drain_timeout):
            while len(table) and not self.force.is_set():
                await trio.sleep(0.05)
        if len(table):
            log.warning(
                "resetting %d connection(s) still open after the drain (drain_timeout %.0f s)",
                len(table),
                self.cfg.drain_timeout,
            )
        connections.cancel()
