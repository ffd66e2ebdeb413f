"""``workers = N``: N worker processes, each a full ``pep run`` for one queue, on one port.

The design, and why it is this simple one:

- **Queues.** An NFQUEUE number can be bound by one process only, so worker ``i`` reads queue
  ``queue + i`` and the SYN rule spreads new connections with
  ``--queue-balance queue:queue+N-1`` (still with ``--queue-bypass``: a worker that is down
  or restarting fails open for its share, those flows go end to end).
- **Listener.** Every worker binds its own listening socket on ``listen_port`` with
  SO_REUSEPORT; the kernel spreads accepted connections over them by a hash of the 4-tuple.
- **The flow table is per process, and that is fine.** The queue balance hashes the address
  pair, the listener hashes the 4-tuple, so the SYN of a connection accepted by worker B was
  usually recorded by worker A. The listener does not need that record: the original
  destination comes from the kernel (SO_ORIGINAL_DST, or the socket address in TPROXY mode),
  which is authoritative anyway. B counts a ``flow_missing`` (about (N-1)/N of connections)
  and A's unclaimed record expires after ``flow_ttl``, bounded by ``flow_table_size``. The
  split-or-bypass decision is taken and enforced at SYN time by whichever worker read the
  SYN (the mark), so it holds whoever accepts the connection. Steering each flow to the worker
  that saw its SYN (a REDIRECT port or mark per worker) would need per-worker rules and still
  put every flow between one client and one server on a single worker; a shared flow table
  would need shared memory and locking. Neither buys anything the kernel does not already give.
- **The master** (this module) owns what is shared: it installs the rules once the workers are
  ready and removes them first on SIGTERM, then tells the workers to drain; it forwards SIGHUP
  (after validating the file itself), restarts a worker that dies, and serves the status
  socket and metrics by asking each worker over its own status socket (``PATH.N``) and
  summing. Workers are started with ``--worker N`` on the master's own command line, so they
  load the configuration exactly as the master did, and get SIGTERM if the master dies
  (PR_SET_PDEATHSIG, see ``WorkerProcess`` for why they are forked from the main thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

from pep.capture.flows import FlowTable
from pep.config import Config, log_level_number
from pep.link.slots import SLOTS_ENV, WorkerSlots
from pep.ops import systemd
from pep.ops.reload import read_reload, reroute
from pep.ops.services import Services, watch_signals
from pep.ops.status import document as status
from pep.ops.status import socket as status_socket
from pep.split.connections import ConnectionTable
from pep.support.errors import describe

__all__ = ["MASTER_PID_ENV", "WorkerError", "WorkerProcess", "supervise"]

log = logging.getLogger(__name__)

MASTER_PID_ENV = "PEP_MASTER_PID"
READY_TIMEOUT = 30.0  # seconds for every worker to bind its queue and listener
RESTART_DELAY = 1.0  # seconds before a dead worker is started again (no crash loop at 100%)
# Seconds the master waits, at its very end, for workers it killed to be gone (SIGKILL takes
# effect at once but for a task blocked in the kernel).
_REAP = 5.0


class WorkerError(RuntimeError):
    """A worker could not be started; the worker's own log line says why."""


class WorkerProcess:
    """A child process forked from the calling thread, awaited through a pidfd.

    Not ``trio.lowlevel.open_process``: it forks in one of trio's cached threads, and the
    kernel sends a child's PR_SET_PDEATHSIG when the *thread* that forked it exits, not the
    process. trio's threads exit after 10 s idle, so every worker got SIGTERM 10 s after it
    started (or restarted) and began to drain: its listener closed, resetting the clients in
    its accept queue, and its connections were reset at ``drain_timeout``. The master's main
    thread (the one running trio) lives as long as the master, which is what the workers'
    death signal means. The fork blocks the event loop for a few milliseconds, only when a
    worker starts.
    """

    def __init__(
        self, cmd: Sequence[str], env: dict[str, str], pass_fds: Sequence[int] = ()
    ) -> None:
        self._popen = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds)
        )
        self.pid = self._popen.pid
        self._pidfd: int | None = os.pidfd_open(self.pid)
        self._wait_lock = trio.Lock()

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        # One waiter at a time (wait_readable allows one per fd), and only the waiter closes
        # the pidfd, so it is never closed under a parked task.
        async with self._wait_lock:
            if self._pidfd is not None:
                if self._popen.poll() is None:
                    await trio.lowlevel.wait_readable(self._pidfd)  # readable once it exited
                os.close(self._pidfd)
                self._pidfd = None
            return self._popen.wait()  # exited by now: reaps it without blocking

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)  # a no-op once reaped: never a recycled pid

    def kill(self) -> None:
        self._popen.kill()

    def reap(self, timeout: float) -> None:
        """Block until it has exited (after ``kill``: at once, but for a task in the kernel),
        at most ``timeout`` seconds."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)


class Master:
    def __init__(
        self,
        cfg: Config,
        argv: Sequence[str],
        reload: Callable[[], Config] | None,
        keep_fds: Sequence[int] = (),
    ):
        self.cfg = cfg
        self.keep_fds = tuple(keep_fds)  # every worker inherits these (see supervise)
        self.argv = list(argv)
        self._reload = reload
        self.n = cfg.workers
        self.procs: list[WorkerProcess | None] = [None] * self.n
        self.restarts = [0] * self.n
        self.state = "starting"
        self.started = time.monotonic()
        self.reloads: dict[str, Any] = {"ok": 0, "failed": 0, "last_error": None}
        self.stopping = trio.Event()
        self.services = Services(cfg.status_socket, cfg.metrics_listen, self.get_document)
        # The workers' link legs, counted where each sees the others' ([link] sharing).
        self.slots = WorkerSlots.create(self.n)

    @property
    def queues(self) -> tuple[int, int]:
        return self.cfg.queue_range

    # --- processes

    def spawn(self, i: int) -> WorkerProcess:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the master talks to systemd
        env[MASTER_PID_ENV] = str(os.getpid())
        cmd = [sys.executable, "-m", "pep.ops.cli", *self.argv, "--worker", str(i)]
        self.slots.reset(i)  # a restarted worker starts with no link legs
        env[SLOTS_ENV] = str(self.slots.fd)
        # From this (the main) thread: see WorkerProcess.
        proc = WorkerProcess(cmd, env, pass_fds=(self.slots.fd, *self.keep_fds))
        self.procs[i] = proc
        log.debug("worker %d started (pid %d)", i, proc.pid)
        return proc

    async def wait_ready(self) -> None:
        """Until every worker answers on its status socket (queue and listener bound)."""
        with trio.move_on_after(READY_TIMEOUT):
            for i in range(self.n):
                while True:
                    proc = self.procs[i]
                    if proc is not None and proc.returncode is not None:
                        raise WorkerError(
                            f"worker {i} exited with status {proc.returncode} while starting"
                        )
                    try:
                        await status_socket.afetch(self.worker_path(i), timeout=1)
                        break
                    except status.StatusError:
                        await trio.sleep(0.05)
            return
        raise WorkerError(f"the workers were not ready within {READY_TIMEOUT:.0f} s")

    async def keep_running(self, i: int) -> None:
        """Restart worker ``i`` whenever it dies, until the daemon stops."""
        while True:
            proc = self.procs[i]
            assert proc is not None
            code = await proc.wait()
            if self.stopping.is_set():
                return
            self.restarts[i] += 1
            log.error(
                "worker %d (pid %d) exited with status %s; restarting it in %.0f s (meanwhile "
                "its queue is bypassed: its share of new connections goes end to end)",
                i,
                proc.pid,
                code,
                RESTART_DELAY,
            )
            await trio.sleep(RESTART_DELAY)
            if self.stopping.is_set():
                return
            self.spawn(i)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(sig)

    async def wait_all(self) -> None:
        for proc in self.procs:
            if proc is not None:
                await proc.wait()

    def kill_all(self, reap: float = 0) -> None:
        """SIGKILL to every worker still running; with ``reap``, wait up to that long for them
        to be gone (the master's last act: its ownership lock, which the workers share, is
        released only after them, so a new pep cannot take over from under a live worker)."""
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for proc in live:
            proc.kill()
        for proc in live if reap else ():
            proc.reap(reap)

    def worker_path(self, i: int) -> str:
        return status_socket.worker_socket(self.cfg.status_socket, i)

    # --- status

    async def get_document(self) -> status.Doc:
        docs: dict[int, status.Doc | str] = {}

        async def ask(i: int) -> None:
            try:
                docs[i] = await status_socket.afetch(self.worker_path(i), timeout=2)
            except status.StatusError as e:
                docs[i] = describe(e)

        async with trio.open_nursery() as nursery:
            for i in range(self.n):
                nursery.start_soon(ask, i)
        own = status.document(
            cfg=self.cfg,
            table=ConnectionTable(),
            listener=None,
            syn=None,
            flows=FlowTable(16, 1.0),
            queues=self.queues,
            kernel_queues=[],
            state=self.state,
            started=self.started,
            reloads=self.reloads,
        )
        merged = status.merge(own, sorted(docs.items()))
        for entry in merged["workers"]:
            entry["restarts"] = self.restarts[entry["worker"]]
        return merged

    # --- signals

    async def watch_signals(self, signals: AsyncIterator[int]) -> None:
        await watch_signals(
            signals,
            reload=self.reload,
            stopping=self.stopping,
            force=lambda: self.signal_all(signal.SIGINT),
            stop_text="new connections go end to end, the workers drain",
            force_text="the workers reset their remaining connections now",
        )

    def reload(self) -> None:
        """Validate the file here, so an invalid one is reported once, not by every worker;
        a valid one is forwarded: each worker reloads it itself."""
        plan = read_reload(self._reload, self.cfg, self.reloads, log)
        if plan is None:
            return
        self.cfg = plan.config
        logging.getLogger().setLevel(log_level_number(self.cfg.log_level))
        reroute(self.cfg.link, log)  # the routes are the master's, as the rules are
        self.signal_all(signal.SIGHUP)


async def supervise(
    cfg: Config,
    argv: Sequence[str],
    reload: Callable[[], Config] | None = None,
    keep_fds: Sequence[int] = (),
) -> None:
    """Run ``cfg.workers`` workers until SIGINT/SIGTERM; the rules are removed on every way out.

    Start: workers, then (all ready) status and metrics, then the rules. Stop: the rules, then
    SIGTERM to the workers, which drain; the master waits drain_timeout plus a margin.
    ``keep_fds`` are inherited by every worker: the namespace's ownership lock
    (pep.kernel.owner), so that it stays held while any process of this daemon lives, also
    workers that outlive a master killed with kill -9 (they drain, still bound to the queues).
    """
    from pep.ops.daemon import install_rules, remove_rules, stop_new_flows  # (imports us)

    master = Master(cfg, argv, reload, keep_fds)
    installed = False
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            for i in range(master.n):
                master.spawn(i)
            await master.wait_ready()
            await master.services.open()
            install_rules(cfg)
            installed = True
            master.state = "running"
            async with trio.open_nursery() as nursery:
                master.services.start(nursery)
                nursery.start_soon(master.watch_signals, signals)
                for i in range(master.n):
                    nursery.start_soon(master.keep_running, i)
                log.info(
                    "ready: splitting TCP from %s via queues %d-%d to port %d with %d workers",
                    ",".join(cfg.interfaces),
                    *master.queues,
                    cfg.listen_port,
                    master.n,
                )
                systemd.notify("READY=1")
                await master.stopping.wait()
                stop_new_flows()  # the rest after the drain: live flows still need it
                master.state = "draining"
                master.signal_all(signal.SIGTERM)
                with trio.move_on_after(master.cfg.drain_timeout + 10):
                    await master.wait_all()
                nursery.cancel_scope.cancel()
    finally:
        try:
            if installed:
                remove_rules()
        finally:
            master.kill_all(reap=_REAP)
        master.services.close()
        if master.state != "starting":  # a start that failed says why, not what it did
            codes = [p.returncode for p in master.procs if p is not None]
            log.info("stopped: worker exit statuses %s", codes)
