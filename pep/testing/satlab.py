"""A satellite link for a test: a lab of its own, and what a test does with it.

``open_lab(...)`` builds the lab that ``pep lab up`` builds (pep.lab.build: namespaces, the
delay line, tbf, pep on the PEP nodes) under a fresh prefix and yields a :class:`SatLab`: run a
command in a node, start a long-running one, read the nodes' addresses, switch the PEP mode,
fade the link. However the body ends (an assertion, an exception, Ctrl-C), the processes it
started are stopped and the lab is removed; a run that was killed outright (SIGKILL, a dead
xdist worker) leaves its lab behind, and the next ``open_lab`` of any process removes it: the
prefix carries the owner's pid (pep.testing.lab_prefix). The pytest fixtures (pep.testing.plugin)
are built on this; it needs no pytest itself.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from pep.lab import build, cluster
from pep.lab import fade as lab_fade
from pep.lab.plan import LabError
from pep.lab.state import Lab, lab_namespaces, state_root
from pep.lab.status import status_text
from pep.testing.lab_prefix import new_prefix, sweep_orphans
from pep.testing.node_commands import (
    NodeCommandError,
    NodeCommandTimeout,
    argv_in,
    arun_grouped,
    command,
    listening_ports,
    run_grouped,
    tail,
)
from pep.testing.satlab_options import MODES, LabConfig, lab_config
from pep.testing.topology import in_netns, ns_socket

__all__ = ["LabError", "NodeProcess", "SatLab", "SharedLabs", "open_lab"]


@dataclass
class NodeProcess:
    """A long-running process a test started in a node (``SatLab.start``); its output goes to a
    file in the lab's directory, shown at teardown."""

    lab: Lab
    name: str
    node: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.lab.running(self.name)

    def output(self) -> str:
        """What it wrote so far (stdout and stderr together)."""
        return self.lab.output(self.name)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; a second call does nothing."""
        self.lab.stop(self.name, timeout=timeout)


class SatLab:
    """A built lab, as a test uses it. ``lab`` is the pep.lab.state.Lab underneath."""

    def __init__(self, lab: Lab, config: LabConfig) -> None:
        self.lab = lab
        self.config = config
        self.mode = "peer" if lab.peer else ("direct" if lab.pep else "none")
        self._started: list[NodeProcess] = []
        self._count = itertools.count(1)  # names stay unique in a lab that outlives a test
        self._fading = False

    @property
    def prefix(self) -> str:
        return self.lab.prefix

    @property
    def profile(self):  # type: ignore[no-untyped-def]  # pep.lab.profiles.LinkProfile
        return self.lab.profile

    @property
    def topology(self) -> str:
        return self.lab.topology

    @property
    def nodes(self) -> list[str]:
        return list(self.lab.nodes)

    def ns(self, node: str) -> str:
        """The node's network namespace (``ip netns exec NS ...``)."""
        self._node(node)
        return self.lab.ns(node)

    def addresses(self, node: str) -> dict[str, str]:
        """The node's IPv4 addresses by interface, e.g. {"lan0": "10.78.1.1", "sat0": ...}."""
        return dict(self._node(node))

    def addr(self, node: str, iface: str | None = None) -> str:
        """The node's address (on ``iface``, which a node with several must be told)."""
        addrs = self._node(node)
        if iface is None and len(addrs) == 1:
            return next(iter(addrs.values()))
        if iface in addrs:
            return addrs[iface]
        raise LabError(
            f"node {node!r} has {', '.join(f'{i} {a}' for i, a in addrs.items()) or 'none'}: "
            + ("say which interface" if iface is None else f"no interface {iface!r}")
        )

    def _node(self, node: str) -> dict[str, str]:
        if node not in self.lab.nodes:
            raise LabError(
                f"no node {node!r} in lab {self.prefix!r} (nodes: {', '.join(self.lab.nodes)})"
            )
        return self.lab.nodes[node]

    # --- commands -----------------------------------------------------------------------------

    def run(
        self,
        node: str,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: bytes | str | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (an argv, or a shell command line) in ``node`` and return it completed,
        its output captured. Raises NodeCommandError (a CalledProcessError naming the node,
        with the end of its stderr) when it fails and ``check``, NodeCommandTimeout when it
        takes longer than ``timeout`` seconds. In a trio test, ``await arun(...)``."""
        argv = argv_in(self.ns(node), cmd)
        try:
            r = run_grouped(argv, input=input, timeout=timeout, text=text)
        except subprocess.TimeoutExpired as e:
            raise NodeCommandTimeout(
                node, self.ns(node), cmd, timeout, e.output, e.stderr
            ) from None
        return self._checked(node, cmd, r, check)

    async def arun(
        self,
        node: str,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: bytes | str | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``run`` for trio: the event loop keeps running (a server of the test's own, say)."""
        argv = argv_in(self.ns(node), cmd)
        try:
            r = await arun_grouped(argv, input=input, timeout=timeout, text=text)
        except subprocess.TimeoutExpired as e:
            raise NodeCommandTimeout(
                node, self.ns(node), cmd, timeout, e.output, e.stderr
            ) from None
        return self._checked(node, cmd, r, check)

    def _checked(
        self, node: str, cmd: object, r: subprocess.CompletedProcess[str], check: bool
    ) -> subprocess.CompletedProcess[str]:
        if check and r.returncode != 0:
            raise NodeCommandError(node, self.ns(node), r.returncode, cmd, r.stdout, r.stderr)
        return r

    def start(
        self,
        node: str,
        cmd: str | Sequence[str],
        *,
        name: str | None = None,
        ready: str | None = None,
        listen: int | None = None,
        timeout: float = 20,
    ) -> NodeProcess:
        """Start a long-running ``cmd`` in ``node`` (stopped when the test ends, its output
        shown then). Returns once it wrote ``ready`` or listens on TCP port ``listen`` in that
        node, when asked; raises LabError with the end of its output if it exits first."""
        argv = command(cmd)
        if name is None:
            base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(argv[0]))
            name = f"{node}.{base}.{next(self._count)}"
        if name in self.lab.procs:
            raise LabError(f"lab {self.prefix!r} already runs a process named {name!r}")
        if listen is not None and listen in self.listening(node):
            raise LabError(f"port {listen} is already listening in node {node!r}: {name} not run")
        popen = self.lab.launch(name, self._check_node(node), argv)
        proc = NodeProcess(self.lab, name, node, popen)
        self._started.append(proc)
        if ready is not None:
            self.lab.wait_ready(name, ready, timeout)
        if listen is not None:
            self._wait_listening(proc, listen, timeout)
        return proc

    def _check_node(self, node: str) -> str:
        self._node(node)
        return node

    def _wait_listening(self, proc: NodeProcess, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while port not in self.listening(proc.node):
            if proc.popen.poll() is not None:
                raise LabError(
                    f"{proc.name} in {self.ns(proc.node)} exited with status "
                    f"{proc.popen.returncode} before listening on port {port}:\n"
                    + tail(proc.output())
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"{proc.name} in {self.ns(proc.node)} not listening on port {port} after "
                    f"{timeout:g} s:\n" + tail(proc.output())
                )
            time.sleep(0.05)

    def listening(self, node: str) -> set[int]:
        """The TCP ports something listens on in ``node`` (IPv4 and IPv6)."""
        ports: set[int] = set()
        with in_netns(self.ns(node)):  # /proc/thread-self/net follows this thread's netns
            for table in ("tcp", "tcp6"):
                with contextlib.suppress(OSError):
                    ports |= listening_ports(Path(f"/proc/thread-self/net/{table}").read_text())
        return ports

    def socket(
        self, node: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket in ``node``'s namespace, for the test's own client or server (a socket
        keeps the namespace it was made in; trio: ``trio.socket.from_stdlib_socket``)."""
        return ns_socket(self.ns(node), family, kind)

    async def open_tcp_stream(self, node: str, host: str, port: int) -> trio.SocketStream:
        """A trio stream connected from ``node`` to ``host:port``."""
        sock = trio.socket.from_stdlib_socket(self.socket(node))
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    # --- pep and the link ---------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        """``none`` (the PEP nodes only route), ``direct`` (pep, each flow its own leg across
        the link) or ``peer`` (pep with its pre-connected legs): pep restarted as needed,
        also in the same mode (a pep a test stopped or killed is started again)."""
        if mode not in MODES:
            raise LabError(f"pep mode {mode!r}: choose {', '.join(MODES)}")
        if mode == self.mode and self.lab.topology in cluster.CLUSTERS:
            return  # a two-gateway lab's peps stay as they are (refuse_split)
        cluster.refuse_split(self.lab)
        if mode == "peer" and not self.lab.peer:
            raise LabError(
                f"pep='peer': lab {self.prefix!r} ({self.topology}) has no pre-connected legs "
                f"([peer] needs a PEP at each end of the link); use pep='direct'"
            )
        self.lab.set_split(mode != "none", direct=mode == "direct")
        self.mode = mode

    def pep_status(self, node: str) -> dict[str, object]:
        """The pep on ``node``'s status document (what ``pep status --json`` prints)."""
        from pep.ops.status.socket import fetch

        return fetch(str(self.lab.dir / f"{self._check_node(node)}.sock"))

    def fade(self, seconds: float, wait: bool = True) -> None:
        """The link delivers nothing, both ways, for ``seconds`` (``pep lab fade``); returns
        when it is back, or at once with ``wait=False``. In a trio test, ``await afade(...)``."""
        until = lab_fade.start_fade(self.prefix, seconds)
        self._fading = True
        if wait:
            try:
                while (left := until - time.monotonic()) > 0:
                    time.sleep(min(left, 0.5))
            finally:
                self.restore_link()

    async def afade(self, seconds: float) -> None:
        """``fade`` for trio; cancelled, it brings the link back at once."""
        until = lab_fade.start_fade(self.prefix, seconds)
        self._fading = True
        try:
            await trio.sleep(max(0.0, until - time.monotonic()))
        finally:
            self.restore_link()

    def restore_link(self) -> None:
        """End a fade now."""
        if self._fading:
            self._fading = False
            lab_fade.stop_fade(self.prefix)

    def status(self) -> str:
        """What ``pep lab status`` prints."""
        return status_text(self.prefix)

    def log(self, name: str) -> str:
        """The log of one of the lab's processes: ``pepa``, ``pepb``, ``delayline``, ``server``
        or one the test started."""
        if name not in self.lab.procs:
            running = ", ".join(self.lab.procs)
            raise LabError(f"lab {self.prefix!r} runs no {name!r} (it runs {running})")
        return self.lab.output(name)

    # --- the end ------------------------------------------------------------------------------

    def end_test(self, say: Callable[[str], None] = print, *, closing: bool = False) -> None:
        """What a test leaves behind in a lab that outlives it: the processes it started
        stopped (their output shown), a fade ended, however each step goes. A link that
        cannot be restored raises (the next test would get a dead link), unless ``closing``:
        the lab is removed anyway."""
        started, self._started = self._started, []
        try:
            if started:
                try:
                    self.lab.stop(*(p.name for p in started))
                    for p in started:
                        say(f"--- {p.name} in node {p.node} ---\n{p.output().rstrip()}")
                finally:
                    for p in started:
                        self.lab.procs.pop(p.name, None)
                    self.lab.save()
        finally:
            with contextlib.suppress(*((LabError, OSError) if closing else ())):
                self.restore_link()

    def close(self, say: Callable[[str], None] = print) -> None:
        """Stop what the test started, remove the lab; LabError if anything is left."""
        try:
            self.end_test(say, closing=True)
        finally:
            build.down(self.prefix, self.lab)
        left = lab_namespaces(self.prefix)
        if left or (state_root() / self.prefix).exists():
            raise LabError(f"lab {self.prefix!r} not removed: {left or state_root() / self.prefix}")


@contextlib.contextmanager
def open_lab(
    config: LabConfig | None = None,
    /,
    *,
    prefix: str | None = None,
    progress: Callable[[str], None] | None = None,
    **kwargs: object,
) -> Iterator[SatLab]:
    """A lab for the body (``config``, or the ``satlab`` marker's keywords: profile, topology,
    pep, rtt, down, up, loss, ...), removed however the body ends."""
    config = config if config is not None else lab_config(**kwargs)
    sweep_orphans()
    lab = build.up(config.spec(prefix or new_prefix()), progress)
    sat = SatLab(lab, config)
    try:
        sat.set_mode(config.pep)
        yield sat
    finally:
        sat.close()


class SharedLabs:
    """Labs shared by many tests (the ``satlab_session`` fixture): one per link configuration
    (``LabConfig.key``), built when first asked for, each test's PEP mode set on the way out,
    all removed by ``close``."""

    def __init__(self, progress: Callable[[str], None] | None = None) -> None:
        self._labs: dict[tuple[object, ...], SatLab] = {}
        self._stack = contextlib.ExitStack()
        self._progress = progress

    def get(self, config: LabConfig) -> SatLab:
        sat = self._labs.get(config.key)
        if sat is None:
            sat = self._stack.enter_context(open_lab(config, progress=self._progress))
            self._labs[config.key] = sat
        sat.set_mode(config.pep)
        return sat

    def close(self) -> None:
        self._labs.clear()
        self._stack.close()
