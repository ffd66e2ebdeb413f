"""What a daemon process serves beside the data path, and the signals it answers: the status
socket and the metrics endpoint (``Services``), and the signal watcher (``watch_signals``),
shared by a single daemon (pep.ops.runtime) and a workers' master (pep.ops.workers).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from pep.ops import systemd
from pep.ops.status import document as status
from pep.ops.status import metrics
from pep.ops.status import socket as status_socket

__all__ = ["Services", "watch_signals"]

log = logging.getLogger(__name__)


class Services:
    """The status socket and the metrics endpoint of one process.

    Bound by ``open`` before the rules go in, outside any nursery, so that a clash (another pep
    on the same status socket, a taken metrics port) fails the start with a plain error and
    nothing installed; served by ``start`` in a nursery that outlives the drain; ``close`` is
    safe on every way out.
    """

    def __init__(
        self, status_path: str, metrics_listen: str, get_doc: Callable[[], Awaitable[status.Doc]]
    ) -> None:
        self.status_path = status_path
        self.metrics_listen = metrics_listen
        self.get_doc = get_doc
        self._status: tuple[socket.socket, int] | None = None
        self._metrics: list[trio.SocketListener] = []

    async def open(self) -> None:
        if self.status_path:
            sock = status_socket.bind_unix(self.status_path)
            self._status = (sock, os.stat(self.status_path).st_ino)
        if self.metrics_listen:
            self._metrics = await metrics.open_listeners(self.metrics_listen)

    def start(self, nursery: trio.Nursery) -> None:
        if self._status is not None:
            nursery.start_soon(status_socket.serve_status, self._status[0], self.get_doc)
        if self._metrics:
            nursery.start_soon(metrics.serve_metrics, self._metrics, self.get_doc)
            log.info("metrics on http://%s/metrics", self.metrics_listen)

    def close(self) -> None:
        if self._status is not None:
            status_socket.unlink_socket(self._status[0], self.status_path, self._status[1])
            self._status = None
        for listener in self._metrics:
            listener.socket.close()
        self._metrics = []


async def watch_signals(
    signals: AsyncIterator[int],
    *,
    reload: Callable[[], object],
    stopping: trio.Event,
    force: Callable[[], None],
    stop_text: str,
    force_text: str,
) -> None:
    """The daemon's signals, for a single process and a workers' master alike: SIGHUP
    reloads (told to systemd), the first SIGTERM/SIGINT sets ``stopping``, a second SIGINT
    calls ``force`` (Ctrl-C twice: do not wait for the drain)."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            systemd.reloading()
            reload()
            systemd.notify("READY=1")
        elif not stopping.is_set():
            log.info("%s: stopping; %s", name, stop_text)
            systemd.notify("STOPPING=1")
            stopping.set()
        elif signum == signal.SIGINT:
            log.info("%s again: %s", name, force_text)
            force()
        else:
            log.info("%s: already stopping", name)
